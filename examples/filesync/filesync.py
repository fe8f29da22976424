"""
File synchronisation and backups over a dtable network.

The master watches a folder and publishes its files into the table; every
other node writes the same tree into its own folder and deletes what the
master deleted:

    python examples/filesync/filesync.py publish --folder ./data --port 9999
    python examples/filesync/filesync.py mirror --folder ./backup --port 10000 \\
        --peer 127.0.0.1:9999

The master polls: every --interval seconds it lists the folder and compares
each file's size, times and mode with the last scan, and reads only the
files that changed. Twisted has no portable file-change notification, and a
poll of a folder's metadata is cheap. The file format is in filetree.py.

Symbolic links, special files and empty directories are not published.
Since dtable keeps its table in memory, this suits folders that fit in
memory several times over. Files are read and written in the reactor's
thread, which is fine for files of a few megabytes.

examples/example.key is a published key for the examples only; make your own
with ``python -m dtable keygen -o net.key`` and pass --key-file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, react
from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
    textFileLogObserver,
)

from dtable import DistributedTable, TableObserver
from dtable.crypto import parse_network_key
from dtable.peers import PeerAddress
from dtable.store import default_data_dir
from dtable.testing import FAST
from filetree import (
    BadObjectError, FileStat, Manifest, TreeIndex, chunk_bytes, delete_file,
    encode_file, read_file, remove_leftovers, scan_folder, write_file,
)

#: The examples' shared, published key.
EXAMPLE_KEY = Path(__file__).resolve().parent.parent / "example.key"
HOST = "127.0.0.1"

#: Chunk data the master publishes per batch at most (about), so that no
#: frame nears the node's frame limit and no catch-up answer its byte limit.
BATCH_BYTES = 16 * 1024 * 1024

#: A file modified this close to the start of a scan may change again
#: within the file system's timestamp granularity without its metadata
#: showing it; it is read again at the next scan rather than trusted.
RECENT_NS = 2_000_000_000

Say = Callable[[str], None]


def say(line: str) -> None:
    print(line, flush=True)


class TreeObserver(TableObserver):
    """
    Keeps a L{TreeIndex} in step with the table's events, on every node.
    """

    def __init__(self, report: Say) -> None:
        self.index = TreeIndex()
        self._say = report

    def object_added(self, obj: dict) -> None:
        try:
            item = self.index.add(obj)
        except BadObjectError as e:
            self._say(f"ignored an object: {e}")
            return
        if isinstance(item, Manifest):
            self.touched(item.path)

    def object_removed(self, obj: dict) -> None:
        item = self.index.remove(obj)
        if isinstance(item, Manifest):
            self.touched(item.path)

    def touched(self, path: str) -> None:
        """
        A manifest of C{path} entered or left the table.
        """


class _Stopped(Exception):
    """
    The node stopped while a scan waited for a batch to be published.
    """


class Publisher(TreeObserver):
    """
    The master: makes the table hold exactly the files of its folder.

    The index, fed by the table's events, says what is published, so a
    master restarted with its table (or one that recovered it from the
    network) republishes only what changed while it was down.
    """

    def __init__(self, table: DistributedTable, root: str, clock: Any,
                 report: Say = say) -> None:
        super().__init__(report)
        self._table = table
        self._root = root
        self._clock = clock
        #: Each file as seen at the last scan, with its sha256.
        self._known: dict[str, tuple[FileStat, str]] = {}
        self._reported: set[str] = set()
        self._pending_bytes = 0
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    async def scan(self) -> None:
        """
        Publish new and changed files (their new chunks, then the manifest)
        and remove the manifests of deleted files, then the chunks no
        manifest refers to any more.
        """
        try:
            files, skipped = scan_folder(self._root)
        except OSError as e:
            self._report_once(f"cannot read {self._root}, publishing nothing: {e}")
            return
        for path, reason in skipped.items():
            self._report_once(f"skipped {path}: {reason}")
        recent = int(self._clock.seconds() * 1e9) - RECENT_NS
        try:
            published = {}
            for path in sorted(files):
                manifest = await self._publish_file(path, files[path], recent)
                if manifest is not None:
                    published[path] = manifest
            self._remove_deleted(published)
            await self._flush()
        except _Stopped:
            return

    async def _publish_file(self, path: str, seen: FileStat, recent: int) -> Manifest | None:
        """
        Publish C{path} if it differs from its manifest.

        @return: its manifest now, or None if it has none (it could not be
            read, or changed while it was).
        """
        current = self.index.current(path)
        try:
            sha256 = self._sha256(path, seen, recent)
            if sha256 is None:
                return current
            if current is not None and (current.sha256, current.mode) == (sha256, seen.mode):
                wanted = current
            else:
                wanted = await self._publish_new(path, seen)
                if wanted is None:
                    return current
        except OSError as e:
            self._report_once(f"cannot read {path}: {e}")
            return current
        for h, manifest in self.index.versions(path).items():
            if manifest != wanted:
                self._table.remove_object(h)
        return wanted

    async def _publish_new(self, path: str, seen: FileStat) -> Manifest | None:
        """
        Add the chunks of C{path} that the table lacks, then its manifest.

        @return: the manifest, or None if the file changed while it was read.
        """
        encoded = encode_file(self._root, path, seen)
        if encoded is None:
            return None
        manifest, chunks = encoded
        new = {c["sha256"]: c for c in chunks if self.index.chunk(c["sha256"]) is None}
        for chunk in new.values():
            await self._add_chunk(chunk)
        self._table.add_object(manifest.to_object())
        self._say(f"published {path} ({manifest.size} bytes, chunks: {len(chunks)}, "
                  f"new: {len(new)})")
        return manifest

    def _sha256(self, path: str, seen: FileStat, recent: int) -> str | None:
        known = self._known.get(path)
        if known is not None and known[0] == seen:
            return known[1]
        sha256 = read_file(self._root, path, seen, lambda raw: None)
        if sha256 is not None and seen.mtime_ns < recent:
            self._known[path] = (seen, sha256)
        return sha256

    def _remove_deleted(self, published: dict[str, Manifest]) -> None:
        for path in self.index.paths():
            if path not in published:
                for h in self.index.versions(path):
                    self._table.remove_object(h)
                self._known.pop(path, None)
                self._say(f"removed {path}")
        referenced = set().union(*(m.chunks for m in published.values()))
        for sha256 in self.index.chunks() - referenced:
            self._table.remove_object(self.index.chunk(sha256))

    async def _add_chunk(self, chunk: dict) -> None:
        self._table.add_object(chunk)
        self._pending_bytes += len(chunk["data"])
        if self._pending_bytes >= BATCH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        self._pending_bytes = 0
        await self._table.flush()
        if self._stopped:
            raise _Stopped()

    def _report_once(self, line: str) -> None:
        if line not in self._reported:
            self._reported.add(line)
            self._say(line)


class Mirror(TreeObserver):
    """
    A node other than the master: writes each file once its manifest and
    all its chunks are in the table, and deletes the files whose manifest
    left it. Call L{sync} after the table changed.
    """

    def __init__(self, root: str, lookup: Callable[[str], dict | None],
                 report: Say = say) -> None:
        super().__init__(report)
        self._root = root
        self._lookup = lookup
        self._dirty: set[str] = set()
        #: Paths whose manifest waits for chunks.
        self._incomplete: set[str] = set()

    def touched(self, path: str) -> None:
        self._dirty.add(path)

    def sync(self) -> None:
        """
        Bring the folder in line with the table. Deletions go first, so that
        a file can replace a directory of the same name and the reverse.
        """
        paths = self._dirty | self._incomplete
        self._dirty, self._incomplete = set(), set()
        current = {path: self.index.current(path) for path in sorted(paths)}
        for path, manifest in current.items():
            if manifest is None:
                self._delete(path)
        for manifest in current.values():
            if manifest is not None:
                self._write(manifest)

    def _delete(self, path: str) -> None:
        try:
            if delete_file(self._root, path):
                self._say(f"deleted {path}")
        except (ValueError, OSError) as e:
            self._say(f"cannot delete {path}: {e}")

    def _write(self, manifest: Manifest) -> None:
        if not self.index.complete(manifest):
            self._incomplete.add(manifest.path)
            return
        try:
            if write_file(self._root, manifest, self._chunks(manifest)):
                self._say(f"wrote {manifest.path} ({manifest.size} bytes)")
        except (ValueError, OSError) as e:
            self._say(f"cannot write {manifest.path}: {e}")

    def _chunks(self, manifest: Manifest) -> Iterator[bytes]:
        for sha256 in manifest.chunks:
            obj = self._lookup(self.index.chunk(sha256))
            if obj is None:
                raise BadObjectError(f"chunk {sha256} left the table")
            yield chunk_bytes(obj)


# The command line ------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, not {text!r}")
    return value


def _port(text: str) -> int:
    if not (text.isdigit() and int(text) < 65536):
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {text!r}")
    return int(text)


def _peer(text: str) -> PeerAddress:
    try:
        return PeerAddress.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _node_options(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--folder", required=True, help="the folder to sync")
    parser.add_argument("--port", type=_port, default=port,
                        help=f"port to listen on, 0 for any free one (default {port})")
    parser.add_argument("--interface", default=HOST,
                        help=f"address to listen on (default {HOST})")
    parser.add_argument("--peer", type=_peer, action="append", default=[],
                        metavar="HOST:PORT", help="a node to dial; repeat for more")
    parser.add_argument("--key-file", default=str(EXAMPLE_KEY),
                        help="the network key (default: the examples' published key)")
    parser.add_argument("--data-dir",
                        help="where the node keeps its table (default: dtable-PORT in "
                             "the working directory); must be outside --folder")
    parser.add_argument("--memory", action="store_true",
                        help="keep the table in memory only: a mirror then does not "
                             "learn of deletions made while it was down")
    parser.add_argument("--fast", action="store_true",
                        help="the short intervals of dtable.testing.FAST, for tests")
    parser.add_argument("--seconds", type=_positive,
                        help="stop after this many seconds (default: run until "
                             "interrupted)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """
    The command line, checked; exits 2 with a message on a bad one. Adds
    C{key} (the key file's text) and C{options} (DistributedTable's
    keyword arguments).
    """
    parser = argparse.ArgumentParser(
        prog="filesync.py",
        description="Synchronise a folder from a master to every node of a dtable "
                    "network.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    publish = commands.add_parser(
        "publish", help="publish a folder (the master)",
        description="Watch a folder (polling every --interval seconds) and publish "
                    "its files as the network's master.")
    _node_options(publish, 9999)
    publish.add_argument("--interval", type=_positive, default=2.0,
                         help="seconds between scans of the folder (default 2)")
    mirror = commands.add_parser(
        "mirror", help="keep a copy of the master's folder",
        description="Write the master's files into a folder and delete what the "
                    "master deleted.")
    _node_options(mirror, 10000)
    args = parser.parse_args(argv)
    sub = publish if args.command == "publish" else mirror
    _check_folders(sub, args)
    try:
        with open(args.key_file, encoding="utf-8") as key_file:
            args.key = key_file.read()
        parse_network_key(args.key)
    except (OSError, ValueError) as e:
        sub.error(f"--key-file {args.key_file}: {e}")
    args.options = {"memory": args.memory, "data_dir": args.data_dir}
    if args.fast:
        args.options.update((k, v) for k, v in FAST.items() if k != "memory")
    return args


def _check_folders(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    folder = os.path.realpath(args.folder)
    if args.command == "publish" and not os.path.isdir(folder):
        parser.error(f"--folder {args.folder} is not a directory")
    if os.path.exists(folder) and not os.path.isdir(folder):
        parser.error(f"--folder {args.folder} is not a directory")
    if not args.memory:
        data_dir = os.path.realpath(args.data_dir or default_data_dir(args.port))
        if os.path.commonpath([folder, data_dir]) == folder:
            parser.error(f"the table's data directory {data_dir} is inside --folder; "
                         f"give another --data-dir")


def _start_logging() -> None:
    """
    Show the node's warnings and errors on stderr; stdout is the program's
    own report.
    """
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def run(reactor: Any, args: argparse.Namespace, table: DistributedTable) -> None:
    """
    Run the node and its publisher or mirror until interrupted, or for
    --seconds.
    """
    publisher: Publisher | None = None
    loop: LoopingCall | None = None
    if args.command == "publish":
        publisher = Publisher(table, args.folder, reactor)
        loop = LoopingCall(lambda: Deferred.fromCoroutine(publisher.scan()))
        loop.clock = reactor
        table.subscribe(publisher)
    else:
        os.makedirs(args.folder, exist_ok=True)
        for path in remove_leftovers(args.folder):
            say(f"removed the unfinished write {path}")
        mirror = Mirror(args.folder, table.get)
        table.subscribe(mirror)
        table.watch(mirror.sync)

    async def stop() -> None:
        if publisher is not None:
            publisher.stop()
            if loop.running:
                loop.stop()
        await table.stopService()

    # Interrupted (Ctrl-C, SIGTERM): the reactor waits for the node to stop.
    shutdown = reactor.addSystemEventTrigger("before", "shutdown",
                                             lambda: Deferred.fromCoroutine(stop()))
    table.startService()
    try:
        await table.when_started()
    except Exception as e:
        print(f"filesync.py: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    say(f"{args.command}: listening on {args.interface}:{table.listening_port}, "
        f"folder {args.folder}")
    finished: Deferred = Deferred()
    if loop is not None:
        # A scan that fails is a bug: exit rather than go on not publishing.
        loop.start(args.interval).addErrback(finished.errback)
    if args.seconds is not None:
        reactor.callLater(args.seconds,
                          lambda: None if finished.called else finished.callback(None))
    await finished  # fires only after --seconds, or fails
    reactor.removeSystemEventTrigger(shutdown)
    await stop()
    say(f"{args.command}: stopped after {args.seconds:g} s")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        table = DistributedTable(port=args.port, key=args.key, peers=args.peer,
                                 master=args.command == "publish",
                                 interface=args.interface, **args.options)
    except ValueError as e:
        print(f"filesync.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    _start_logging()
    react(run, (args, table))


if __name__ == "__main__":
    main()
