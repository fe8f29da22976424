"""
Canonical JSON bytes of a table object, and the hashes built on them.

This layer owns the one rule that turns a JSON object into bytes and the bytes
into an identity: an object's hash is the lowercase hex sha256 of its canonical
bytes, and two objects are the same table entry exactly when their canonical
bytes are equal. It also owns the reverse direction: L{decode_object}
accepts only bytes that are already canonical, so that a hash computed over
bytes from elsewhere is the hash of the object they decode to. (Batches from
peers need not be checked so: their hashes are taken over the bytes as they
arrived, and only the master's canonical bytes give the root it signed.)

It knows nothing of sockets, time, the table, or where bytes come from.

The canonical form is what C{json.dumps} produces with sorted keys, no
whitespace, raw (unescaped) non-ASCII text encoded as UTF-8, and no NaN or
Infinity::

    {"ip":"192.0.2.1","name":"www","tags":["a","ü"]}

Choices that an implementation in another language must reproduce:

  - Only a JSON object (a C{dict}) can be a table entry; its keys, at every
    level, must be C{str}. Keys are sorted by code point.
  - Values are C{dict}, C{list}, C{str}, C{int}, C{float}, C{bool} or
    C{None}. A C{tuple} is rejected rather than silently written as a list:
    an object read back from the table or the network holds lists, and an
    entry should compare equal to what was stored.
  - C{True} and C{1} are different values (C{true} and C{1}), and so are
    C{1} and C{1.0}: floats are written with Python's shortest round-trip
    C{repr} (C{1.0}, C{1e+16}, C{-0.0}), so C{{"n": 1}} and C{{"n": 1.0}}
    hash differently. Send integers as integers.
  - NaN and the infinities are not JSON and are rejected.
  - Nesting is limited to L{MAX_DEPTH} containers, the top-level object
    counting as one. This also rejects self-referencing structures.
  - Strings must be valid Unicode: a lone surrogate cannot be encoded as
    UTF-8 and is rejected.
  - Integers are limited only by Python's integer-to-text conversion limit
    (4300 digits by default); a larger one is rejected.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, NoReturn

import orjson

__all__ = [
    "HASH_RE",
    "MAX_DEPTH",
    "InvalidObjectError",
    "JSONObject",
    "canonical_bytes",
    "decode_object",
    "hash_bytes",
    "is_hash",
    "load_stored",
    "object_hash",
]

JSONObject = dict[str, Any]
"""The type of a table entry: a JSON object with string keys."""

MAX_DEPTH = 100
"""The deepest nesting of containers accepted; the top-level object is 1."""

HASH_RE = re.compile(r"[0-9a-f]{64}")
"""A hash as this package writes it: 64 lowercase hex digits (use fullmatch)."""

_ENCODER = json.JSONEncoder(
    sort_keys=True,
    separators=(",", ":"),
    ensure_ascii=False,
    allow_nan=False,
    # Cycles are caught by the depth limit before the encoder runs.
    check_circular=False,
)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)

#: The integers orjson writes (it refuses larger ones).
_INT_LOW, _INT_HIGH = -(2**63), 2**64 - 1

#: orjson's output shorter than this is copied into a bytes object of its
#: own size (see L{canonical_bytes}); a longer one is kept, as copying it
#: would cost more than its slack.
_COPY_BELOW = 2**20


class InvalidObjectError(ValueError):
    """
    The value is not a JSON object dtable can hold; C{str()} says why and,
    for a problem inside the object, where (as a path such as C{$["a"][2]}).
    """


_PATH_SHOWN = 8
"""How many steps of the path to a problem an error message shows."""


class _Invalid(Exception):
    """
    Raised inside the validator; each enclosing container adds its key or
    index on the way out, so the path costs nothing unless there is an error.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []


def _invalid(reason: str, path: list[str]) -> InvalidObjectError:
    if not path:
        return InvalidObjectError(reason)
    steps = path[::-1]
    if len(steps) > _PATH_SHOWN:
        steps[_PATH_SHOWN:] = ["..."]
    return InvalidObjectError(f"{reason} (at ${''.join(steps)})")


def _check_value(value: Any, depth: int) -> bool:
    """
    Check that C{value} is a JSON value nested no deeper than L{MAX_DEPTH}.

    @param depth: the number of containers enclosing C{value}.
    @return: whether it is L{plain<_check_container>}.
    @raise _Invalid: if it is not JSON.
    """
    if isinstance(value, str) or value is None or value is True or value is False:
        return True
    if isinstance(value, int):
        return _INT_LOW <= value <= _INT_HIGH
    if isinstance(value, float):
        if math.isfinite(value):
            return False
        if value != value:
            raise _Invalid("NaN is not JSON")
        raise _Invalid("Infinity is not JSON")
    if isinstance(value, (dict, list)):
        return _check_container(value, depth + 1)
    if isinstance(value, tuple):
        raise _Invalid("tuples are not accepted; use a list")
    raise _Invalid(f"values of type {type(value).__name__} are not JSON")


def _check_container(container: dict[Any, Any] | list[Any], depth: int) -> bool:
    """
    Check a dict or list that is the C{depth}th container from the top.

    @return: whether it is I{plain}: its containers are plain C{dict}s and
        C{list}s, its keys plain C{str}s and its numbers integers of at most
        64 bits, so that L{orjson} writes it exactly as the JSON encoder
        does (see L{canonical_bytes}).
    @raise _Invalid: if it or anything inside it is not JSON.
    """
    if depth > MAX_DEPTH:
        raise _Invalid(f"nested deeper than {MAX_DEPTH} levels")
    # The JSON encoder reads a dict subclass through its items(), orjson
    # reads what the dict holds.
    plain = type(container) is dict or type(container) is list
    if isinstance(container, dict):
        for key, item in container.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    raise _Invalid(
                        f"keys must be strings, not {type(key).__name__} ({key!r})"
                    )
                plain = False  # the encoder sorts with the subclass's own "<"
            try:
                if not _check_value(item, depth):
                    plain = False
            except _Invalid as e:
                e.path.append(f"[{json.dumps(key, ensure_ascii=False)}]")
                raise
    else:
        for index, item in enumerate(container):
            try:
                if not _check_value(item, depth):
                    plain = False
            except _Invalid as e:
                e.path.append(f"[{index}]")
                raise
    return plain


def _check_depth(container: dict[str, Any] | list[Any], depth: int) -> None:
    """
    Check only the nesting depth of a structure made by the JSON decoder,
    whose keys and values are known to be JSON already.

    @raise _Invalid: if it is nested deeper than L{MAX_DEPTH}.
    """
    if depth > MAX_DEPTH:
        raise _Invalid(f"nested deeper than {MAX_DEPTH} levels")
    items = container.values() if isinstance(container, dict) else container
    for item in items:
        if isinstance(item, (dict, list)):
            _check_depth(item, depth + 1)


def _encode(obj: JSONObject) -> str:
    """
    The canonical text of an object that has passed a check.

    @raise InvalidObjectError: for what only the encoder detects (a float
        that overflows, an integer too long to write).
    """
    try:
        return _ENCODER.encode(obj)
    except (ValueError, OverflowError) as e:
        raise InvalidObjectError(f"cannot be written as JSON: {e}") from None


def canonical_bytes(obj: JSONObject) -> bytes:
    """
    The canonical JSON bytes of a table object.

    @param obj: a C{dict} with C{str} keys whose values are JSON values, as
        described in the module docstring.
    @return: UTF-8 bytes of the canonical JSON text.
    @raise InvalidObjectError: if C{obj} is not a JSON object dtable can
        hold; the message says why and where.

    A plain object (see L{_check_container}: no floats, no integers past 64
    bits, no subclasses of C{dict} or of C{str} as keys) is written by
    L{orjson}, byte for byte what the JSON encoder writes and several times
    faster: 0.5 us against 2.6 us for an object of 150 bytes, 41 ms against
    265 ms for a string of 64 MB, which the encoder escapes a character at a
    time.
    """
    if not isinstance(obj, dict):
        raise InvalidObjectError(
            f"a table object must be a JSON object (dict), not {type(obj).__name__}"
        )
    try:
        plain = _check_container(obj, 1)
    except _Invalid as e:
        raise _invalid(e.reason, e.path) from None
    if plain:
        try:
            data = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # a lone surrogate, which the encoder below names
        else:
            # orjson writes into a buffer of 1 KiB (or more, grown) from the
            # system allocator and shrinks it in place; held as they came,
            # 100,000 small objects kept 400 MB of heap (20 MB as copies).
            return data if len(data) >= _COPY_BELOW else memoryview(data).tobytes()
    text = _encode(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidObjectError(
            "strings must be valid Unicode (found a lone surrogate)"
        ) from None


def hash_bytes(data: bytes) -> str:
    """
    The hash dtable uses for C{data}: lowercase hex sha256.

    @param data: any bytes; for an object, its canonical bytes.
    @return: 64 lowercase hex digits.
    """
    return hashlib.sha256(data).hexdigest()


def object_hash(obj: JSONObject) -> str:
    """
    The hash of a table object, C{hash_bytes(canonical_bytes(obj))}.

    @raise InvalidObjectError: as L{canonical_bytes} does.
    """
    return hash_bytes(canonical_bytes(obj))


def decode_object(data: bytes) -> JSONObject:
    """
    Parse the canonical bytes of an object received from elsewhere.

    Only canonical bytes are accepted: re-encoding the result gives exactly
    C{data} back, so C{hash_bytes(data)} is the object's hash. Anything else
    (whitespace, unsorted or repeated keys, escapes where raw text belongs,
    C{1e2} for C{100.0}, another Unicode encoding, a byte order mark) is
    rejected as not canonical.

    @param data: the bytes as received.
    @return: the object, a new C{dict}.
    @raise InvalidObjectError: if C{data} is not UTF-8, not JSON, not a JSON
        object, nested deeper than L{MAX_DEPTH}, or not canonical.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidObjectError("not valid UTF-8") from None
    except AttributeError:
        raise InvalidObjectError(f"expected bytes, not {type(data).__name__}") from None
    try:
        obj = _DECODER.decode(text)
    except RecursionError:
        raise InvalidObjectError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise InvalidObjectError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidObjectError(
            f"a table object must be a JSON object, not {type(obj).__name__}"
        )
    # Counting brackets over-counts (brackets inside strings count too), so
    # when the count is within the limit the depth certainly is, and the
    # walk is needed only for objects with many containers.
    if text.count("{") + text.count("[") > MAX_DEPTH:
        try:
            _check_depth(obj, 1)
        except _Invalid as e:
            raise InvalidObjectError(e.reason) from None
    if _encode(obj) != text:
        # Equal text means equal bytes: strict UTF-8 maps one to the other
        # both ways, and a decoded lone surrogate cannot equal its escape.
        raise InvalidObjectError("not canonical")
    return obj


def load_stored(data: bytes) -> JSONObject:
    """
    Parse the bytes of an object this node stored: they were checked as
    they arrived (L{canonical_bytes} on the master, the signed root on
    every other node), so they are only parsed, at a tenth of the cost of
    L{decode_object}.
    """
    return _DECODER.decode(data.decode("utf-8"))


def is_hash(value: object) -> bool:
    """
    Whether C{value} is a hash as dtable writes it (64 lowercase hex digits).
    """
    return isinstance(value, str) and HASH_RE.fullmatch(value) is not None
