"""
The file tree as table objects, and the file system work on both sides: what
a folder holds, how a file becomes chunk objects and a manifest, which paths
are safe to write, and writing or deleting one file in a mirror's folder.

A file is published as:

  - chunk objects, one per CHUNK_SIZE bytes of it::

        {"type": "file-chunk", "sha256": "<of the raw bytes>",
         "data": "<base64 of the zlib-compressed bytes>"}

  - one manifest that names them in order::

        {"type": "file", "path": "docs/a.txt", "size": 1234, "sha256": "...",
         "mode": 420, "chunks": ["<sha256>", ...]}

A chunk is identified by its content, so files and versions that share
content share chunk objects. Paths are relative POSIX paths; mode is the
permission bits (0-0o777).

This module knows nothing of Twisted or the network: the program in
filesync.py feeds it the table's events and calls its functions.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import tempfile
import zlib
from typing import Any, Callable, Iterator

import attrs

from dtable.canonical import object_hash

#: Raw bytes per chunk. Compressed and in base64 a chunk object stays under
#: 350 KiB even for incompressible data, far below the node's frame limit
#: (128 MiB by default), and a change to a large file republishes only the
#: chunks it touched.
CHUNK_SIZE = 256 * 1024

CHUNK_TYPE = "file-chunk"
MANIFEST_TYPE = "file"

#: Prefix of the temporary files a mirror writes before renaming them.
TEMP_PREFIX = ".filesync-"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class UnsafePathError(ValueError):
    """
    A path would leave the folder (absolute, "..", a symbolic link on the
    way) or is not a plain relative POSIX path; str() says why.
    """


class BadObjectError(ValueError):
    """
    A table object says it is a chunk or a manifest but is malformed, or a
    chunk's data does not match its hash; str() says what is wrong.
    """


class CorruptFileError(ValueError):
    """
    The chunks of a manifest do not add up to the file it describes.
    """


def safe_parts(path: Any) -> tuple[str, ...]:
    """
    The components of C{path}, a relative POSIX path that stays inside the
    folder it is relative to.

    @raise UnsafePathError: if it is empty, absolute, has an empty, "." or
        ".." component, a backslash or a NUL character.
    """
    if type(path) is not str or not path:
        raise UnsafePathError(f"{path!r} is not a path")
    if "\\" in path or "\0" in path:
        raise UnsafePathError(f"{path!r} holds a backslash or NUL character")
    if path.startswith("/"):
        raise UnsafePathError(f"{path!r} is absolute")
    parts = tuple(path.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePathError(f"{path!r} has an empty, '.' or '..' component")
    return parts


def directory_inside(root: str, parts: tuple[str, ...], create: bool) -> str | None:
    """
    The directory inside C{root} that holds the file C{parts} names, without
    following a symbolic link on the way (one could point out of C{root}).

    @param create: make the missing directories; otherwise return None if
        one is missing.

    @raise UnsafePathError: if a directory on the way is a symbolic link.
    @raise OSError: if one cannot be made, or is a file.
    """
    current = root
    for name in parts[:-1]:
        current = os.path.join(current, name)
        if os.path.islink(current):
            raise UnsafePathError(f"{'/'.join(parts)}: {current} is a symbolic link")
        if not os.path.isdir(current):
            if not create:
                return None
            os.mkdir(current)
    return current


# Objects ---------------------------------------------------------------------


@attrs.frozen
class Manifest:
    """
    One file as the master published it.

    @ivar chunks: the sha256 of each chunk, in order.
    """

    path: str
    size: int
    sha256: str
    mode: int
    chunks: tuple[str, ...]

    def to_object(self) -> dict[str, Any]:
        return {"type": MANIFEST_TYPE, "path": self.path, "size": self.size,
                "sha256": self.sha256, "mode": self.mode, "chunks": list(self.chunks)}


def _is_int(value: Any, low: int, high: int | None = None) -> bool:
    return type(value) is int and low <= value and (high is None or value <= high)


def _is_sha256(value: Any) -> bool:
    return type(value) is str and _SHA256.fullmatch(value) is not None


def parse_manifest(obj: dict[str, Any]) -> Manifest:
    """
    The manifest C{obj} (a table object of type "file") describes.

    @raise BadObjectError: if a field is missing or out of range, or the
        path is unsafe.
    """
    chunks = obj.get("chunks")
    if not (_is_int(obj.get("size"), 0) and _is_sha256(obj.get("sha256"))
            and _is_int(obj.get("mode"), 0, 0o777) and type(chunks) is list
            and all(_is_sha256(c) for c in chunks)):
        raise BadObjectError(f"malformed manifest for {obj.get('path')!r}")
    try:
        safe_parts(obj.get("path"))
    except UnsafePathError as e:
        raise BadObjectError(f"manifest with an unsafe path: {e}") from None
    return Manifest(path=obj["path"], size=obj["size"], sha256=obj["sha256"],
                    mode=obj["mode"], chunks=tuple(chunks))


def chunk_object(raw: bytes) -> dict[str, Any]:
    """
    The chunk object that carries C{raw} (at most L{CHUNK_SIZE} bytes).
    """
    return {"type": CHUNK_TYPE, "sha256": hashlib.sha256(raw).hexdigest(),
            "data": base64.b64encode(zlib.compress(raw)).decode("ascii")}


def chunk_bytes(obj: dict[str, Any]) -> bytes:
    """
    The raw bytes a chunk object carries, checked against its hash.
    Decompression stops past L{CHUNK_SIZE}, so a crafted object cannot make
    a mirror inflate gigabytes.

    @raise BadObjectError: if the data is not base64 of zlib data of at
        most CHUNK_SIZE bytes whose sha256 is the object's.
    """
    try:
        packed = base64.b64decode(obj["data"], validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, CHUNK_SIZE)
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise BadObjectError(f"chunk {obj.get('sha256')!r} does not decode: {e}") from None
    if not inflater.eof or inflater.unconsumed_tail:
        raise BadObjectError(f"chunk {obj.get('sha256')!r} is truncated or too large")
    if hashlib.sha256(raw).hexdigest() != obj.get("sha256"):
        raise BadObjectError(f"chunk {obj.get('sha256')!r} does not match its hash")
    return raw


class TreeIndex:
    """
    The manifests and chunks a table holds, kept in step with its events.

    A path normally has one manifest. While a change is on its way it can
    briefly have two (the new one arrived, the old one is not removed yet);
    the latest added is the current one.
    """

    def __init__(self) -> None:
        self._paths: dict[str, dict[str, Manifest]] = {}
        #: Chunk sha256 -> the hash of the table object that carries it.
        self._chunks: dict[str, str] = {}

    def add(self, obj: dict[str, Any]) -> Manifest | str | None:
        """
        Note an object that entered the table.

        @return: its manifest, the sha256 of its chunk, or None for an
            object of another type.
        @raise BadObjectError: if it is a malformed manifest or chunk.
        """
        kind = obj.get("type")
        if kind == MANIFEST_TYPE:
            manifest = parse_manifest(obj)
            self._paths.setdefault(manifest.path, {})[object_hash(obj)] = manifest
            return manifest
        if kind == CHUNK_TYPE:
            if not (_is_sha256(obj.get("sha256")) and type(obj.get("data")) is str):
                raise BadObjectError("malformed chunk")
            self._chunks[obj["sha256"]] = object_hash(obj)
            return obj["sha256"]
        return None

    def remove(self, obj: dict[str, Any]) -> Manifest | str | None:
        """
        Note an object that left the table; returns what L{add} returned.
        """
        kind = obj.get("type")
        if kind == MANIFEST_TYPE and type(obj.get("path")) is str:
            versions = self._paths.get(obj["path"], {})
            manifest = versions.pop(object_hash(obj), None)
            if not versions:
                self._paths.pop(obj["path"], None)
            return manifest
        if kind == CHUNK_TYPE and self._chunks.get(obj.get("sha256")) == object_hash(obj):
            del self._chunks[obj["sha256"]]
            return obj["sha256"]
        return None

    def current(self, path: str) -> Manifest | None:
        versions = self._paths.get(path)
        return next(reversed(versions.values())) if versions else None

    def versions(self, path: str) -> dict[str, Manifest]:
        """
        Every manifest of C{path}, by the hash of its table object.
        """
        return dict(self._paths.get(path, {}))

    def paths(self) -> list[str]:
        return list(self._paths)

    def chunk(self, sha256: str) -> str | None:
        """
        The hash of the table object that carries chunk C{sha256}, if any.
        """
        return self._chunks.get(sha256)

    def chunks(self) -> set[str]:
        return set(self._chunks)

    def complete(self, manifest: Manifest) -> bool:
        return all(sha in self._chunks for sha in manifest.chunks)


# The master's folder ---------------------------------------------------------


@attrs.frozen
class FileStat:
    """
    What tells whether a file changed without reading it.
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileStat":
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                   inode=st.st_ino, mode=stat.S_IMODE(st.st_mode) & 0o777)


def scan_folder(root: str) -> tuple[dict[str, FileStat], dict[str, str]]:
    """
    The regular files under C{root}, by relative POSIX path. Symbolic links
    and special files are not followed or published; names that cannot be
    published (not UTF-8, or holding a backslash) are returned apart.

    @return: the files, and the names left out with the reason.
    @raise OSError: if a directory cannot be read (a partial listing would
        look like deleted files).
    """
    files: dict[str, FileStat] = {}
    skipped: dict[str, str] = {}
    todo = [""]
    while todo:
        prefix = todo.pop()
        for entry in _entries(os.path.join(root, prefix)):
            rel = prefix + entry.name
            try:
                rel.encode("utf-8")
                safe_parts(rel)
            except (UnicodeEncodeError, UnsafePathError):
                printable = rel.encode("utf-8", "backslashreplace").decode("utf-8")
                skipped[printable] = "the name is not UTF-8 or holds a backslash"
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(rel + "/")
                elif entry.is_file(follow_symlinks=False):
                    files[rel] = FileStat.of(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue  # deleted while we looked
    return files, skipped


def _entries(directory: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return []  # deleted while we looked


def read_file(root: str, rel: str, expected: FileStat,
              each_chunk: Callable[[bytes], None]) -> str | None:
    """
    Read the file C{rel} in chunks of L{CHUNK_SIZE}, passing each to
    C{each_chunk}.

    @return: its sha256, or None if it is gone or changed from C{expected}
        while it was read (it is read again at the next scan).
    @raise OSError: if it cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(os.path.join(root, *rel.split("/")), "rb") as f:
            for raw in iter(lambda: f.read(CHUNK_SIZE), b""):
                digest.update(raw)
                each_chunk(raw)
            if FileStat.of(os.fstat(f.fileno())) != expected:
                return None
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def encode_file(root: str, rel: str,
                expected: FileStat) -> tuple[Manifest, list[dict[str, Any]]] | None:
    """
    The manifest and chunk objects of the file C{rel}, or None if it is gone
    or changed while it was read.

    @raise OSError: if it cannot be read.
    """
    chunks: list[dict[str, Any]] = []
    sha256 = read_file(root, rel, expected, lambda raw: chunks.append(chunk_object(raw)))
    if sha256 is None:
        return None
    return Manifest(path=rel, size=expected.size, sha256=sha256, mode=expected.mode,
                    chunks=tuple(c["sha256"] for c in chunks)), chunks


# A mirror's folder -----------------------------------------------------------


def _holds(target: str, manifest: Manifest) -> bool:
    """
    Whether C{target} already is the file C{manifest} describes (a mirror
    restarted with its table reads its own files back).
    """
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    if not (stat.S_ISREG(st.st_mode) and st.st_size == manifest.size
            and stat.S_IMODE(st.st_mode) & 0o777 == manifest.mode):
        return False
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for raw in iter(lambda: f.read(CHUNK_SIZE), b""):
            digest.update(raw)
    return digest.hexdigest() == manifest.sha256


def write_file(root: str, manifest: Manifest, chunks: Iterator[bytes]) -> bool:
    """
    Make the file C{manifest} describes in C{root} from C{chunks} (its
    chunks' raw bytes, in order): written to a temporary file next to it,
    checked against the manifest's size and sha256, synced, then renamed
    over the old one, so that the file is always either the old or the new
    version, never a mix.

    @return: False if the file was already there, True if it was written.
    @raise UnsafePathError: if the path would leave C{root}.
    @raise CorruptFileError: if the chunks are not the file; nothing is
        changed.
    @raise OSError: if it cannot be written.
    """
    parts = safe_parts(manifest.path)
    parent = directory_inside(root, parts, create=True)
    target = os.path.join(parent, parts[-1])
    if _holds(target, manifest):
        return False
    fd, temporary = tempfile.mkstemp(dir=parent, prefix=TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            digest, size = hashlib.sha256(), 0
            for raw in chunks:
                digest.update(raw)
                size += len(raw)
                f.write(raw)
            if (size, digest.hexdigest()) != (manifest.size, manifest.sha256):
                raise CorruptFileError(f"{manifest.path}: the chunks make {size} bytes "
                                       f"with another sha256 than the manifest says")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, manifest.mode)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    return True


def remove_leftovers(root: str) -> list[str]:
    """
    Delete the temporary files a mirror that stopped in the middle of a
    write left behind.

    @return: their paths.
    """
    removed = []
    for directory, _, names in os.walk(root):
        for name in names:
            if name.startswith(TEMP_PREFIX) and name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
    return removed


def delete_file(root: str, path: str) -> bool:
    """
    Delete the file C{path} from C{root}, then the directories that this
    left empty (directories are not published, so a mirror keeps none of
    its own making).

    @return: whether there was a file to delete.
    @raise UnsafePathError: if the path would leave C{root}.
    @raise OSError: if it cannot be deleted (for example, it is a
        directory).
    """
    parts = safe_parts(path)
    parent = directory_inside(root, parts, create=False)
    if parent is None:
        return False
    try:
        os.unlink(os.path.join(parent, parts[-1]))
    except FileNotFoundError:
        return False
    for depth in range(len(parts) - 1, 0, -1):
        try:
            os.rmdir(os.path.join(root, *parts[:depth]))
        except OSError:
            break  # not empty
    return True
