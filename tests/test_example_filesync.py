"""
examples/filesync: the file format and path checks on their own, and a
master with two mirrors as child processes whose folders must end up equal
to the master's, byte for byte, after files are created, changed and
deleted.
"""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

from dtable.canonical import canonical_bytes
from tests.test_examples import EXAMPLES, Child, ExampleProcessTestCase

SCRIPT = "filesync/filesync.py"

#: Seconds the nodes have to start and mirror the folder, then to follow a
#: change.
FIRST_SYNC_DEADLINE = 15.0
CHANGE_DEADLINE = 10.0
#: Seconds the nodes run before stopping by themselves, should a test lose
#: track of them.
NODE_SECONDS = "60"


def _load_filetree() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "filetree", EXAMPLES / "filesync" / "filetree.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


filetree = _load_filetree()


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _temporary_dir(case: SynchronousTestCase) -> Path:
    """
    A fresh directory, removed after the test (trial's mktemp would leave
    one in the working directory under pytest).
    """
    path = tempfile.mkdtemp(prefix="dtable-filesync-")
    case.addCleanup(shutil.rmtree, path)
    return Path(path)


def _tree(root: Path) -> dict[str, tuple[int, bytes]] | None:
    """
    Every file under C{root} with its permission bits and bytes, or None if
    one vanished while it was read (a mirror is renaming into place).
    """
    try:
        return {path.relative_to(root).as_posix():
                (stat.S_IMODE(path.stat().st_mode), path.read_bytes())
                for path in root.rglob("*") if path.is_file()}
    except FileNotFoundError:
        return None


class PathSafetyTests(SynchronousTestCase):
    def test_relative_posix_paths(self) -> None:
        """
        Plain relative paths split into their components.
        """
        self.assertEqual(filetree.safe_parts("a.txt"), ("a.txt",))
        self.assertEqual(filetree.safe_parts("docs/ü b/.hidden"), ("docs", "ü b", ".hidden"))

    def test_paths_that_leave_the_folder(self) -> None:
        """
        Absolute paths, empty, "." and ".." components, backslashes, NUL and
        non-strings are refused.
        """
        for path in ["", "/etc/passwd", "../x", "a/../../x", "a/..", "./a", "a//b",
                     "a/", "a\\..\\b", "a\0b", None, 5, ["a"]]:
            with self.assertRaises(filetree.UnsafePathError, msg=repr(path)):
                filetree.safe_parts(path)

    def test_symbolic_link_out_of_the_folder(self) -> None:
        """
        A directory on the way that is a symbolic link (here, to a folder
        outside) is refused for writing and for deleting, and nothing
        outside changes.
        """
        root, outside = _temporary_dir(self), _temporary_dir(self)
        _write(outside / "victim", b"keep me")
        (root / "link").symlink_to(outside)
        manifest = filetree.Manifest(path="link/new", size=0,
                                     sha256=filetree.hashlib.sha256(b"").hexdigest(),
                                     mode=0o644, chunks=())
        with self.assertRaises(filetree.UnsafePathError):
            filetree.write_file(str(root), manifest, iter([]))
        with self.assertRaises(filetree.UnsafePathError):
            filetree.delete_file(str(root), "link/victim")
        self.assertEqual(sorted(p.name for p in outside.iterdir()), ["victim"])
        self.assertEqual((outside / "victim").read_bytes(), b"keep me")


class EncodingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.master, self.mirror = _temporary_dir(self), _temporary_dir(self)
        # Two and a half chunks of incompressible bytes.
        self.data = random.Random(8).randbytes(2 * filetree.CHUNK_SIZE + 1000)
        _write(self.master / "sub" / "f.bin", self.data, 0o640)

    def encode(self) -> tuple:
        files, skipped = filetree.scan_folder(str(self.master))
        self.assertEqual((list(files), skipped), (["sub/f.bin"], {}))
        return filetree.encode_file(str(self.master), "sub/f.bin", files["sub/f.bin"])

    def test_file_round_trip(self) -> None:
        """
        A file becomes one manifest and a chunk object per CHUNK_SIZE bytes,
        each well below the node's frame limit; a mirror that holds them
        writes the same bytes and mode.
        """
        manifest, chunks = self.encode()
        self.assertEqual((manifest.path, manifest.size, manifest.mode, len(manifest.chunks)),
                         ("sub/f.bin", len(self.data), 0o640, 3))
        self.assertEqual(manifest.sha256, filetree.hashlib.sha256(self.data).hexdigest())
        self.assertEqual(b"".join(map(filetree.chunk_bytes, chunks)), self.data)
        for chunk in chunks:
            self.assertLess(len(canonical_bytes(chunk)), 400 * 1024)
        self.assertEqual(filetree.parse_manifest(manifest.to_object()), manifest)

        index = filetree.TreeIndex()
        index.add(manifest.to_object())
        self.assertFalse(index.complete(manifest))
        for chunk in chunks:
            index.add(chunk)
        self.assertTrue(index.complete(manifest))

        written = filetree.write_file(str(self.mirror), manifest,
                                      map(filetree.chunk_bytes, chunks))
        self.assertTrue(written)
        self.assertEqual(_tree(self.mirror), _tree(self.master))
        # Already there: not written again.
        self.assertFalse(filetree.write_file(str(self.mirror), manifest, iter([])))
        self.assertTrue(filetree.delete_file(str(self.mirror), "sub/f.bin"))
        self.assertEqual(list(self.mirror.iterdir()), [])

    def test_chunks_that_do_not_make_the_file(self) -> None:
        """
        Chunks that do not add up to the manifest's file leave the mirror's
        folder as it was, without a temporary file.
        """
        manifest, chunks = self.encode()
        with self.assertRaises(filetree.CorruptFileError):
            filetree.write_file(str(self.mirror), manifest,
                                map(filetree.chunk_bytes, chunks[:2]))
        self.assertEqual(_tree(self.mirror), {})

    def test_bad_chunks(self) -> None:
        """
        A chunk whose data does not match its hash, or that inflates past
        CHUNK_SIZE, is refused.
        """
        chunk = filetree.chunk_object(b"some bytes")
        tampered = dict(chunk, data=filetree.chunk_object(b"other bytes")["data"])
        bomb = filetree.chunk_object(bytes(filetree.CHUNK_SIZE + 1))
        for bad in [tampered, bomb, dict(chunk, data="not base64!"),
                    dict(chunk, data="ünïcode"), dict(chunk, data=None)]:
            with self.assertRaises(filetree.BadObjectError):
                filetree.chunk_bytes(bad)

    def test_bad_manifests(self) -> None:
        """
        A manifest with an unsafe path or a field out of range is refused.
        """
        manifest, _ = self.encode()
        good = manifest.to_object()
        for change in [{"path": "../f"}, {"path": "/etc/f"}, {"size": -1},
                       {"mode": 0o4755}, {"chunks": ["xyz"]}, {"sha256": None}]:
            with self.assertRaises(filetree.BadObjectError, msg=repr(change)):
                filetree.parse_manifest(dict(good, **change))

    def test_latest_manifest_of_a_path(self) -> None:
        """
        While a change is on its way a path can have two manifests; the
        latest added is current, and the other remains once it leaves.
        """
        old, _ = self.encode()
        new = filetree.Manifest(path=old.path, size=0, mode=0o600, chunks=(),
                                sha256=filetree.hashlib.sha256(b"").hexdigest())
        index = filetree.TreeIndex()
        index.add(old.to_object())
        index.add(new.to_object())
        self.assertEqual(index.current(old.path), new)
        index.remove(new.to_object())
        self.assertEqual(index.current(old.path), old)
        index.remove(old.to_object())
        self.assertEqual((index.current(old.path), index.paths()), (None, []))


def _report(children: list[Child]) -> str:
    return "\n\n".join(f"--- {c.name} (exit {c.process.returncode})\n{c.output}"
                       for c in children)


class FileSyncNetworkTests(ExampleProcessTestCase):
    def start_node(self, *args: str) -> Child:
        return self.start(SCRIPT, *args, "--port", "0", "--memory", "--fast",
                          "--seconds", NODE_SECONDS, env=self.environment())

    def listening_port(self, child: Child) -> int:
        pattern = re.compile(r"listening on 127\.0\.0\.1:(\d+)")

        def port() -> re.Match | None:
            return next(filter(None, map(pattern.search, child.lines)), None)

        self.read_until([child], lambda: port() is not None,
                        time.monotonic() + FIRST_SYNC_DEADLINE)
        found = port()
        self.assertIsNotNone(found, child.output)
        return int(found.group(1))

    def assert_mirrored(self, master: Path, mirrors: list[Path], children: list[Child],
                        seconds: float, why: str) -> None:
        """
        Read the nodes' output until every mirror's folder equals the
        master's (each mirror reports every file it writes or deletes), or
        C{seconds} pass.
        """
        expected = _tree(master)

        def mirrored() -> bool:
            return all(_tree(mirror) == expected for mirror in mirrors)

        self.assertTrue(self.read_until(children, mirrored, time.monotonic() + seconds),
                        f"{why}: the mirrors' folders differ from the master's\n"
                        + _report(children))

    def test_mirrors_follow_the_master(self) -> None:
        """
        Two mirrors write the master's folder, a nested file and a file of
        several megabytes included; when files are changed, added and
        deleted they follow; a change to a few bytes of the large file
        publishes one new chunk. Told to stop, every node exits 0.
        """
        root = Path(self.cwd)
        master = root / "master"
        rng = random.Random(1)
        _write(master / "big.bin", rng.randbytes(4 * 1024 * 1024 + 123))
        _write(master / "notes.txt", b"first version\n")
        _write(master / "docs" / "nested" / "deep.txt", b"deep\n", 0o600)
        _write(master / "empty", b"")
        publisher = self.start_node("publish", "--folder", str(master), "--interval", "0.1")
        port = self.listening_port(publisher)
        mirrors = [root / "mirror1", root / "mirror2"]
        # What a mirror stopped in the middle of a write leaves behind.
        _write(mirrors[0] / "docs" / ".filesync-x1y2.tmp", b"half a fi")
        children = [publisher] + [
            self.start_node("mirror", "--folder", str(mirror), "--peer", f"127.0.0.1:{port}")
            for mirror in mirrors]
        self.assert_mirrored(master, mirrors, children, FIRST_SYNC_DEADLINE, "at start")

        with open(master / "big.bin", "r+b") as big:
            big.seek(3 * 1024 * 1024)
            big.write(b"changed in place")
        _write(master / "notes.txt", b"second version, longer\n")
        _write(master / "new" / "file.txt", rng.randbytes(1000))
        (master / "docs" / "nested" / "deep.txt").unlink()
        self.assert_mirrored(master, mirrors, children, CHANGE_DEADLINE, "after changes")

        codes = self.stop_all(children)
        report = _report(children)
        self.assertEqual(codes, [0, 0, 0], report)
        self.assertIn("published big.bin (4194427 bytes, chunks: 17, new: 1)",
                      publisher.lines, report)
        self.assertIn("removed docs/nested/deep.txt", publisher.lines, report)
        for child in children:
            self.assertFalse([line for line in child.lines
                              if line.startswith(("cannot", "ignored", "Traceback"))],
                             report)


class CommandLineTests(ExampleProcessTestCase):
    def test_bad_command_lines(self) -> None:
        """
        A bad option is reported by name with exit code 2, before the node
        starts; --help exits 0.
        """
        Path(self.cwd, "weak.key").write_text("password")
        cases = [
            (["publish"], "--folder"),
            (["publish", "--folder", "missing"], "not a directory"),
            (["publish", "--folder", ".", "--port", "20000"], "inside --folder"),
            (["publish", "--folder", ".", "--memory", "--interval", "0"], "--interval"),
            (["mirror", "--folder", "m", "--port", "70000"], "--port"),
            (["mirror", "--folder", "m", "--peer", "nowhere"], "--peer"),
            (["mirror", "--folder", "m", "--key-file", "weak.key"], "--key-file"),
            (["mirror", "--folder", "m", "--port", "0"], "data_dir"),
        ]
        children = [self.start(SCRIPT, *args, env=self.environment()) for args, _ in cases]
        helped = self.start(SCRIPT, "mirror", "--help", env=self.environment())
        for child, (args, expected) in zip(children, cases):
            self.assertEqual(self.wait_then_stop(child), 2, child.output)
            self.assertIn(expected, child.output, args)
        self.assertEqual(self.wait_then_stop(helped), 0, helped.output)
        self.assertIn("--peer HOST:PORT", helped.output)
        self.assertFalse(Path(self.cwd, "m").exists())
