"""
Storage of a node's table and head behind L{IStore}.

This module owns how a state is kept: the head and the canonical bytes of
every object, by hash. The store is the only place those bytes live; the
in-memory table (L{dtable.table.Table}) keeps just the hashes and the Merkle
trie, and L{dtable.replication.Replica} moves table and store together.

L{SqliteStore} keeps the state in one SQLite file, the default for a node
(L{default_data_dir}, L{DB_NAME}). L{MemoryStore} keeps it in memory, for
tests and for nodes that rebuild from the network at every start; it can be
handed to a new node in the same process to model a node that restarts with
what it had.

It knows nothing of sockets, the network, signatures or Merkle roots: it
stores the head it is given and does not check it against the objects.
"""

from __future__ import annotations

import itertools
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from twisted.logger import Logger
from zope.interface import implementer

from dtable.canonical import HASH_RE
from dtable.interfaces import IStore
from dtable.table import EMPTY_ROOT
from dtable.wire import Head

log = Logger(namespace="dtable.store")

__all__ = [
    "BackgroundSqliteStore",
    "DB_NAME",
    "SCHEMA_VERSION",
    "MemoryStore",
    "SqliteStore",
    "StoreClosed",
    "StoreError",
    "default_data_dir",
    "empty_head",
]

DB_NAME = "table.sqlite3"
"""The name of a node's SQLite file inside its data directory."""

SCHEMA_VERSION = 2
"""The layout of the SQLite file this version writes, in C{PRAGMA user_version};
a file of version 1 is rewritten to it when opened."""

_IN_LIMIT = 500
"""The most hashes one C{IN (...)} query carries."""

_match_hash = HASH_RE.fullmatch


def default_data_dir(port: int) -> str:
    """
    The data directory of a node listening on C{port} that was given none:
    C{dtable-<port>} in the current directory.
    """
    return os.path.join(os.getcwd(), f"dtable-{port}")


def empty_head() -> Head:
    """
    The head of a table the master never published to.
    """
    return Head(rev=0, base=0, root=EMPTY_ROOT)


class StoreClosed(Exception):
    """
    The store was used before open() or after close().
    """


class StoreError(Exception):
    """
    The storage cannot be used: it cannot be opened or read, it is not a
    dtable store, it was written by a newer version, or a write failed.

    @ivar path: the file concerned.
    @ivar reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot use the store {path!r}: {reason}")
        self.path = path
        self.reason = reason


def _check_hash(h: object) -> str:
    """
    @return: C{h}, if it is a hash (64 lowercase hex digits).
    @raise ValueError: if it is not.
    """
    if type(h) is not str or _match_hash(h) is None:
        raise ValueError(f"not a hash: {h!r:.80}")
    return h


def _raw_hashes(hs: list) -> bytes | None:
    """
    The raw 32 bytes of every item of C{hs}, concatenated, if every item is
    a hash as L{_check_hash} takes one; else None.

    The text is checked by converting it and back: C{bytes.fromhex} takes
    upper case and spaces too, but then its C{hex()} differs. For 100,000
    hashes the two take 5 and 7 ms, where a regular expression over the
    joined text took 31 ms in one call that holds the interpreter lock, on
    the writer thread that must share it with the reactor's.
    """
    if not (set(map(type, hs)) <= _STR and set(map(len, hs)) <= _SIXTY_FOUR):
        return None
    text = "".join(hs)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if raw.hex() == text else None


def _check_hashes(hs: list) -> list[str]:
    """
    @return: C{hs}, if every item is a hash: checked as L{_check_hash}
        checks one, but a commit's thousands at once.
    @raise ValueError: naming the first that is not.
    """
    if _raw_hashes(hs) is not None:
        return hs
    for h in hs:
        _check_hash(h)
    raise AssertionError("unreachable: every hash was valid")


_STR = frozenset([str])
_BYTES = frozenset([bytes])
_SIXTY_FOUR = frozenset([64])


def _check_data(data: object) -> bytes:
    """
    @return: C{data}, if it is bytes.
    @raise TypeError: if it is not.
    """
    if type(data) is not bytes:
        raise TypeError(f"canonical bytes must be bytes, not {type(data).__name__}")
    return data


@implementer(IStore)
class MemoryStore:
    """
    An IStore in memory: a dict from hash to canonical bytes. A commit is
    atomic because it checks every argument before it changes anything and
    cannot be interrupted halfway. Nothing survives the process.
    """

    def __init__(self) -> None:
        self._head = empty_head()
        self._data: dict[str, bytes] = {}
        self._open = False

    def open(self) -> None:
        self._open = True

    def head(self) -> Head:
        self._check()
        return self._head

    def count(self) -> int:
        self._check()
        return len(self._data)

    def hashes(self) -> Iterator[str]:
        self._check()
        return iter(self._data)

    def get(self, h: str) -> bytes | None:
        self._check()
        return self._data.get(_check_hash(h))

    def get_many(self, hs: Iterable[str]) -> dict[str, bytes]:
        self._check()
        data = self._data
        return {h: data[h] for h in map(_check_hash, hs) if h in data}

    def items(self) -> Iterator[tuple[str, bytes]]:
        self._check()
        return iter(self._data.items())

    def commit(
        self, head: Head, adds: list[tuple[str, bytes]], removes: list[str]
    ) -> None:
        self._check()
        removes = [_check_hash(h) for h in removes]
        adds = [(_check_hash(h), _check_data(data)) for h, data in adds]
        for h in removes:
            self._data.pop(h, None)
        for h, data in adds:
            self._data.setdefault(h, data)
        self._head = head

    def close(self) -> None:
        self._open = False

    def _check(self) -> None:
        if not self._open:
            raise StoreClosed("the store is not open")


# Objects are rows in the order they were written, found by a unique index
# on the hash. (Version 1 kept them in a WITHOUT ROWID table keyed by hash:
# with random keys, each commit of a bulk load rewrote most of the table's
# pages, rows and all, where now mostly the index's small entries are.)
_OBJECTS = """
    CREATE TABLE {name} (
        id INTEGER PRIMARY KEY,
        hash BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
        data BLOB NOT NULL
    )
    """

_SCHEMA = (
    _OBJECTS.format(name="objects"),
    """
    CREATE TABLE head (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        rev INTEGER NOT NULL,
        base INTEGER NOT NULL,
        root TEXT NOT NULL,
        sig TEXT NOT NULL,
        master TEXT NOT NULL
    )
    """,
)

_MIN_LOG = 40 * 1024 * 1024
_MAX_LOG = 160 * 1024 * 1024

PAGE_SIZE = 16384
"""
The page size of the files this version creates (SQLite's default is 4
KiB). Writing a million objects in transactions as the writer gathers
them took 5.4-5.7 s of CPU instead of 7.0-7.3 (the kernel's share 0.8-0.9
s instead of 1.9-2.0), and a read of 1,500 objects by hash 14 ms instead of
12. A file keeps the page size it was created with.
"""

_SET_HEAD = (
    "INSERT OR REPLACE INTO head (id, rev, base, root, sig, master) "
    "VALUES (0, ?, ?, ?, ?, ?)"
)


def _key(h: str) -> bytes:
    """
    The stored form of a hash: its 32 raw bytes.

    @raise ValueError: if C{h} is not a hash.
    """
    return bytes.fromhex(_check_hash(h))


def _keys(hs: list[str]) -> list[bytes]:
    """
    The stored forms of many hashes, converted at once.

    @raise ValueError: if one of C{hs} is not a hash.
    """
    hs = list(hs)
    raw = _raw_hashes(hs)
    if raw is None:
        _check_hashes(hs)
        raise AssertionError("unreachable: _raw_hashes took every hash")
    return [raw[i:i + 32] for i in range(0, len(raw), 32)]


def _datas(adds: list[tuple[str, bytes]]) -> list[bytes]:
    """
    The canonical bytes of C{adds}, checked to be bytes.

    @raise TypeError: if one is not.
    """
    datas = [data for _, data in adds]
    if not set(map(type, datas)) <= _BYTES:
        for data in datas:
            _check_data(data)
    return datas


@implementer(IStore)
class SqliteStore:
    """
    An IStore in one SQLite file.

    Objects are rows in the order they were written (the hash's 32 raw
    bytes and the object's canonical bytes), found by a unique index on the
    hash; the head is the one row of a second table. The layout's version
    is the file's C{PRAGMA user_version} (L{SCHEMA_VERSION}); a file from a
    newer version is refused rather than misread.

    Each L{commit} is one SQLite transaction (C{BEGIN IMMEDIATE} ...
    C{COMMIT}). The file is in write-ahead-log mode with C{synchronous=NORMAL}:
    after the process crashes at any moment the file holds exactly the state
    of the last completed commit. After a power loss or an operating-system
    crash it may have lost the newest commits (they were in the log but not
    yet synced), but it still holds one whole committed state, never a mix;
    a node in that case is behind and catches up like any other.

    The store is used from one thread, the one that opened it.

    @ivar path: the SQLite file.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: the SQLite file; it and its directory are created by
            L{open} if missing. Nothing is read or written here.
        """
        self.path = os.fspath(path)
        self._db: sqlite3.Connection | None = None
        #: The page cache set by size_cache, in KiB; 0 for SQLite's own.
        self._cache_kib = 0
        #: The checkpoint interval set by size_log, in pages; 0 for SQLite's own.
        self._checkpoint_pages = 0

    @classmethod
    def in_directory(cls, data_dir: str) -> SqliteStore:
        """
        The store of a node whose data directory is C{data_dir}.
        """
        return cls(os.path.join(data_dir, DB_NAME))

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # Opening and closing ------------------------------------------------------

    def open(self) -> None:
        """
        Open the file, creating it, its directory and its tables if missing.
        Opening an open store does nothing.

        @raise StoreError: if the directory cannot be created, the file
            cannot be read or is not a dtable store, or it was written by a
            newer version of dtable.
        """
        if self._db is not None:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        except OSError as e:
            raise StoreError(self.path, f"cannot create its directory: {e}") from e
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(self.path, f"cannot open it: {e}") from e
        try:
            self._prepare(db)
        except sqlite3.Error as e:
            db.close()
            raise StoreError(self.path, f"not a readable dtable store: {e}") from e
        except BaseException:
            db.close()
            raise
        self._db = db

    def _prepare(self, db: sqlite3.Connection) -> None:
        """
        Check the file's version, switch it to write-ahead logging and
        create the tables of a new file.
        """
        # Read the version before writing anything, so that a file from a
        # newer version is left exactly as it was.
        version = self._version(db)
        # Only a new file takes it: one in WAL mode keeps its page size.
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(self.path, f"write-ahead logging is not available "
                                        f"(journal mode {mode!r})")
        db.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have created or upgraded it since the
                # first look.
                version = self._version(db)
                if version == 0:
                    self._create(db)
                elif version == 1:
                    self._upgrade_from_1(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if db.execute("SELECT count(*) FROM head WHERE id = 0").fetchone()[0] != 1:
            raise StoreError(self.path, "it has no head")

    def _version(self, db: sqlite3.Connection) -> int:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                self.path,
                f"it was written by a newer version of dtable (schema version "
                f"{version}; this version reads up to {SCHEMA_VERSION})",
            )
        return version

    def _create(self, db: sqlite3.Connection) -> None:
        if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(self.path, "it is an SQLite file of something else "
                                        "(it holds tables but no dtable schema version)")
        for statement in _SCHEMA:
            db.execute(statement)
        head = empty_head()
        db.execute(_SET_HEAD, (head.rev, head.base, head.root, head.sig, head.master))
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _upgrade_from_1(self, db: sqlite3.Connection) -> None:
        log.info("rewriting {path} from schema version 1 to {version}",
                 path=self.path, version=SCHEMA_VERSION)
        db.execute(_OBJECTS.format(name="objects_new"))
        db.execute("INSERT INTO objects_new (hash, data) SELECT hash, data FROM objects")
        db.execute("DROP TABLE objects")
        db.execute("ALTER TABLE objects_new RENAME TO objects")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def size_cache(self, rows: int) -> None:
        """
        Size SQLite's page cache for a store of about C{rows} objects: 48
        bytes per object (about the whole hash index), at least SQLite's
        own 2 MiB and at most 64 MiB. A writer calls it as the store grows;
        inserts at random places in an index much larger than the cache
        read most of its pages back from the file. Writing a million
        objects in transactions of 50,000 cost the writer 7.8 s of CPU with
        16 MiB of cache and 6.5 s with 48 MiB (in a file of 4 KiB pages).
        """
        kib = min(max(rows * 48 // 1024, 2048), 65536)
        if kib != self._cache_kib:
            self._open_db().execute(f"PRAGMA cache_size = -{kib}")
            self._cache_kib = kib

    def size_log(self, rows: int) -> None:
        """
        Set how much write-ahead log a store of about C{rows} objects
        gathers before it is checkpointed (copied into the file, and the
        file synced): 160 bytes per object, at least 40 MiB and at most 160
        MiB. A writer calls it as the store grows. A bulk load rewrites most
        of the hash index in every transaction, and a checkpoint copies each
        page once however often the log holds it: a million objects written
        as the writer gathers them cost 5.4-5.7 s of CPU with a checkpoint
        per 160 MB and 5.9-6.0 s per 40 MB, and as much sized this way as
        per 160 MB (alternated runs). A small store keeps a small log.
        """
        page_size = self._open_db().execute("PRAGMA page_size").fetchone()[0]
        pages = min(max(rows * 160, _MIN_LOG), _MAX_LOG) // page_size
        if pages != self._checkpoint_pages:
            self._open_db().execute(f"PRAGMA wal_autocheckpoint = {pages}")
            self._checkpoint_pages = pages

    def close(self) -> None:
        """
        Close the file. Idempotent; the store may be opened again.
        """
        db, self._db = self._db, None
        self._cache_kib = 0
        self._checkpoint_pages = 0
        if db is not None:
            db.close()

    # Reading ------------------------------------------------------------------

    def head(self) -> Head:
        row = self._query("SELECT rev, base, root, sig, master FROM head WHERE id = 0"
                          ).fetchone()
        if row is None:
            raise StoreError(self.path, "it has no head")
        rev, base, root, sig, master = row
        return Head(rev=rev, base=base, root=root, sig=sig, master=master)

    def count(self) -> int:
        return self._query("SELECT count(*) FROM objects").fetchone()[0]

    def hashes(self) -> Iterator[str]:
        return self._hashes(self._query("SELECT hash FROM objects"))

    def _hashes(self, cursor: sqlite3.Cursor) -> Iterator[str]:
        try:
            for (key,) in cursor:
                yield key.hex()
        except sqlite3.Error as e:
            raise self._failed("reading", e) from e

    def items(self) -> Iterator[tuple[str, bytes]]:
        return self._items(self._query("SELECT hash, data FROM objects"))

    def _items(self, cursor: sqlite3.Cursor) -> Iterator[tuple[str, bytes]]:
        try:
            for key, data in cursor:
                yield key.hex(), data
        except sqlite3.Error as e:
            raise self._failed("reading", e) from e

    def get(self, h: str) -> bytes | None:
        self._open_db()
        key = _key(h)
        row = self._query("SELECT data FROM objects WHERE hash = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def get_many(self, hs: Iterable[str]) -> dict[str, bytes]:
        db = self._open_db()
        keys = map(_key, hs)
        found: dict[str, bytes] = {}
        try:
            while chunk := list(itertools.islice(keys, _IN_LIMIT)):
                marks = ",".join("?" * len(chunk))
                for key, data in db.execute(
                    f"SELECT hash, data FROM objects WHERE hash IN ({marks})", chunk
                ):
                    found[key.hex()] = data
        except sqlite3.Error as e:
            raise self._failed("reading", e) from e
        return found

    # Writing ------------------------------------------------------------------

    def commit(
        self, head: Head, adds: list[tuple[str, bytes]], removes: list[str]
    ) -> None:
        """
        See L{IStore.commit}.

        @raise StoreError: if SQLite fails (a full disk, an I/O error); the
            transaction is rolled back.
        """
        db = self._open_db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM objects WHERE hash = ?",
                               [(key,) for key in _keys(removes)])
                db.executemany("INSERT OR IGNORE INTO objects (hash, data) VALUES (?, ?)",
                               zip(_keys([h for h, _ in adds]), _datas(adds)))
                db.execute(_SET_HEAD,
                           (head.rev, head.base, head.root, head.sig, head.master))
                db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back on some errors.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise self._failed("writing", e) from e

    # Helpers ------------------------------------------------------------------

    def _open_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreClosed(f"the store {self.path!r} is not open")
        return self._db

    def _query(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        db = self._open_db()
        try:
            return db.execute(sql, params)
        except sqlite3.Error as e:
            raise self._failed("reading", e) from e

    def _failed(self, doing: str, e: sqlite3.Error) -> StoreError:
        return StoreError(self.path, f"{doing} failed: {e}")


class _Pending:
    """
    One commit queued for the writer: what it adds and removes, for reads
    until it is on disk.
    """

    __slots__ = ("head", "adds", "removes", "ops")

    def __init__(self, head: Head, adds: list[tuple[str, bytes]],
                 removes: list[str]) -> None:
        self.head = head
        self.adds = dict(adds)
        self.removes = set(removes)
        self.ops = len(self.adds) + len(self.removes)


#: Put on the writer's queue by a reader that needs the file up to date:
#: the writer stops gathering and writes what it has.
_HURRY = object()


def _merged(entries: list[_Pending]) -> tuple[Head, list[tuple[str, bytes]], list[str]]:
    """
    One commit that has the effect of C{entries} in order: removes are
    written before adds, so a hash removed and then added again is both.
    """
    adds: dict[str, bytes] = {}
    removes: dict[str, None] = {}
    for entry in entries:
        for h in entry.removes:
            adds.pop(h, None)
            removes[h] = None
        for h, data in entry.adds.items():
            # An add of a hash already there keeps the bytes it has.
            adds.setdefault(h, data)
    return entries[-1].head, list(adds.items()), list(removes)


@implementer(IStore)
class BackgroundSqliteStore:
    """
    An L{SqliteStore} whose commits are written by a thread of its own, so
    that the thread that calls L{commit} (the reactor's) does not wait for
    SQLite.

    Commits are written in order, each one transaction, as L{SqliteStore}
    writes them. Until one is on disk, reads answer from it in memory, so
    the store reads as if every commit were done. A crash loses the
    commits still queued, never part of one: the file holds the state of
    the last commit written, which a node catches up from like any other
    state. L{close} waits until every commit is written.

    The writer gathers commits into one transaction while they keep coming
    (each within C{gather_idle} seconds of the last), until they hold
    C{gather_ops} ops or a tenth of the stored objects, whichever is more,
    or the first of them has waited C{gather_delay} seconds, or half of
    C{max_pending} commits wait. A bulk load is written in few large
    transactions; a lone change is on disk within C{gather_idle}. With
    random hashes for keys, every transaction rewrites most pages of the
    hash index, so the larger the store, the larger a transaction must be
    to cost little per object:
    writing 100,000 objects in transactions of 2,000 took the writer 0.75 s
    of CPU, in transactions of 10,000 0.63 s; 1,000,000 objects in
    transactions of 5,000 took 13.8 s, of 50,000 10.0 s (in a file of 4 KiB
    pages, before L{PAGE_SIZE}). For the same reason SQLite's page cache
    grows with the store (L{SqliteStore.size_cache}).
    A crash loses at most what was gathered and not yet written, whole
    commits only. Reads that go to the file (L{count}, L{hashes},
    L{items}) and L{close} make the writer write what it has at once.

    At most C{max_pending} commits wait; a further L{commit} waits for the
    writer, which bounds the memory held for a slow disk. If the writer
    fails (a full disk), the failure is logged and every later L{commit}
    raises L{StoreError}.

    @ivar path: the SQLite file.
    """

    def __init__(self, path: str, max_pending: int = 128,
                 writer_factory: type[SqliteStore] = SqliteStore,
                 gather_ops: int = 10_000, gather_delay: float = 10.0,
                 gather_idle: float = 0.25) -> None:
        """
        @param path: the SQLite file.
        @param max_pending: commits that may wait for the writer at most.
        @param writer_factory: makes the writer's L{SqliteStore} (tests
            give it one that fails).
        @param gather_ops: ops the writer gathers into one transaction
            before it writes, at least (in a store of more than ten times
            as many objects, a tenth of them).
        @param gather_delay: seconds the writer waits for more commits
            after the first, at most.
        @param gather_idle: seconds the writer waits for the next commit,
            at most: it gathers only while commits keep coming.
        """
        self.path = os.fspath(path)
        self._reader = SqliteStore(self.path)
        self._writer_factory = writer_factory
        self._max_pending = max_pending
        self._gather_ops = gather_ops
        self._gather_delay = gather_delay
        self._gather_idle = gather_idle
        self._pending: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._work: queue.Queue[_Pending | object | None] = queue.Queue()
        self._space = threading.Semaphore(max_pending)
        self._thread: threading.Thread | None = None
        self._error: StoreError | None = None
        #: The writer took the end marker along with the last commits.
        self._closing = False

    @classmethod
    def in_directory(cls, data_dir: str) -> "BackgroundSqliteStore":
        return cls(os.path.join(data_dir, DB_NAME))

    def __repr__(self) -> str:
        return f"BackgroundSqliteStore({self.path!r})"

    # Opening and closing ------------------------------------------------------

    def open(self) -> None:
        if self._thread is not None:
            return
        self._reader.open()
        self._error = None
        self._closing = False
        opened: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._write, args=(opened,),
                                        name=f"dtable store writer {self.path}",
                                        daemon=True)
        self._thread.start()
        failure = opened.get()
        if failure is not None:
            self._thread.join()
            self._thread = None
            self._reader.close()
            raise failure

    def close(self) -> None:
        """
        Wait until every queued commit is written, then close the file.
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            self._work.put(None)
            thread.join()
        self._reader.close()

    @property
    def pending(self) -> int:
        """
        Commits queued for the writer, not yet on disk.
        """
        with self._lock:
            return len(self._pending)

    # Reading ------------------------------------------------------------------

    def head(self) -> Head:
        self._check()
        with self._lock:
            if self._pending:
                return self._pending[-1].head
        return self._reader.head()

    def count(self) -> int:
        self._drain()
        return self._reader.count()

    def hashes(self) -> Iterator[str]:
        self._drain()
        return self._reader.hashes()

    def items(self) -> Iterator[tuple[str, bytes]]:
        self._drain()
        return self._reader.items()

    def get(self, h: str) -> bytes | None:
        return self.get_many([h]).get(h)

    def get_many(self, hs: Iterable[str]) -> dict[str, bytes]:
        self._check()
        wanted = list(hs)
        with self._lock:
            pending = list(self._pending)
        found: dict[str, bytes] = {}
        # The newest pending commit that mentions a hash decides it. Set
        # operations, not a loop over the wanted hashes per commit: up to
        # max_pending commits wait while a bulk load is gathered. Each
        # costs the smaller of the two sides (subtracting a commit's adds
        # walked all of them, for every removal batch of a bulk removal).
        open_ = set(wanted)
        for entry in reversed(pending):
            if not open_:
                break
            adds = entry.adds
            hits = adds.keys() & open_
            for h in hits:
                found[h] = adds[h]
            open_ -= hits
            removes = entry.removes
            if removes:
                open_ = open_ - removes
        rest = [h for h in wanted if h in open_]
        if rest:
            found.update(self._reader.get_many(rest))
        return found

    # Writing ------------------------------------------------------------------

    def commit(self, head: Head, adds: list[tuple[str, bytes]],
               removes: list[str]) -> None:
        """
        See L{IStore.commit}: queue the commit for the writer; it reads as
        done at once.

        @raise StoreError: if an earlier commit could not be written.
        """
        self._check()
        removes = _check_hashes(list(removes))
        _check_hashes([h for h, _ in adds])
        _datas(adds)
        if self._error is not None:
            raise self._error
        self._space.acquire()
        entry = _Pending(head, adds, removes)
        with self._lock:
            self._pending.append(entry)
        self._work.put(entry)

    # The writer thread -----------------------------------------------------------

    def _write(self, opened: "queue.Queue[BaseException | None]") -> None:
        writer = self._writer_factory(self.path)
        try:
            writer.open()
        except BaseException as e:
            opened.put(e)
            return
        opened.put(None)
        try:
            # The stored objects, roughly (an add of a hash already there
            # counts too): what the gathering and the cache are sized by.
            rows = writer.count()
            writer.size_cache(rows)
            writer.size_log(rows)
            while (entries := self._next_entries(max(self._gather_ops, rows // 10))) is not None:
                self._write_entries(writer, entries)
                rows += sum(len(e.adds) - len(e.removes) for e in entries)
                writer.size_cache(rows)
                writer.size_log(rows)
                # Not held while waiting for the next: they are all the
                # objects of up to max_pending commits.
                del entries
            self._work.task_done()  # the end marker
        finally:
            writer.close()

    def _write_entries(self, writer: SqliteStore, entries: list[_Pending]) -> None:
        if self._error is None:
            head, adds, removes = _merged(entries)
            try:
                writer.commit(head, adds, removes)
            except StoreError as e:
                self._error = e
                log.critical("cannot write the table to {path}: {reason}; "
                             "changes are kept in memory only", path=self.path,
                             reason=str(e))
            else:
                with self._lock:
                    for _ in entries:
                        self._pending.popleft()
        for _ in entries:
            self._space.release()
            self._work.task_done()

    def _next_entries(self, gather_ops: int) -> list[_Pending] | None:
        """
        The commits waiting, at least one (waiting for it); None at the end.

        The commits gathered are written as one transaction: the file goes
        from the state before the first to the state after the last, and a
        crash still loses whole commits only. See the class docstring for
        when the writer stops gathering.
        """
        if self._closing:
            return None
        entry = self._work.get()
        while entry is _HURRY:
            self._work.task_done()
            entry = self._work.get()
        if entry is None:
            return None
        assert isinstance(entry, _Pending)
        entries = [entry]
        ops = entry.ops
        # The writer's own thread: a reactor's clock cannot wake it.
        deadline = time.monotonic() + self._gather_delay
        hurry = False
        while len(entries) < self._max_pending:
            wait = deadline - time.monotonic()
            try:
                if (hurry or wait <= 0 or ops >= gather_ops
                        or len(entries) >= self._max_pending // 2):
                    entry = self._work.get_nowait()
                else:
                    entry = self._work.get(timeout=min(wait, self._gather_idle))
            except queue.Empty:
                break
            if entry is None:
                self._closing = True
                break
            if entry is _HURRY:
                self._work.task_done()
                hurry = True
                continue
            assert isinstance(entry, _Pending)
            entries.append(entry)
            ops += entry.ops
        return entries

    def _drain(self) -> None:
        self._check()
        self._work.put(_HURRY)
        self._work.join()

    def _check(self) -> None:
        if self._thread is None:
            raise StoreClosed(f"the store {self.path!r} is not open")
