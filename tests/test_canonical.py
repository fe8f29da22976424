"""
Tests for L{dtable.canonical}.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dtable.canonical import (
    MAX_DEPTH,
    InvalidObjectError,
    canonical_bytes,
    decode_object,
    hash_bytes,
    is_hash,
    object_hash,
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)


def reference(obj: dict[str, Any]) -> bytes:
    """
    The canonical bytes as the module defines them.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def reorder(value: Any) -> Any:
    """
    The same JSON value with every object's keys inserted in reverse order.
    """
    if isinstance(value, dict):
        return {key: reorder(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(item) for item in value]
    return value


def nested(depth: int) -> dict[str, Any]:
    """
    An object whose containers are nested C{depth} deep, the top included.
    """
    obj: dict[str, Any] = {}
    for _ in range(depth - 1):
        obj = {"a": obj}
    return obj


class CanonicalBytesTests(SynchronousTestCase):
    """
    L{canonical_bytes} writes one byte string per object.
    """

    def test_known_bytes_and_hash(self) -> None:
        """
        The canonical form is compact sorted JSON with raw UTF-8 text, and the
        hash is the sha256 of it; these values are fixed for every
        implementation.
        """
        obj = {"b": 1, "a": [True, None, "ü", 1.5, -0.0, {"z": {}, "y": []}]}
        expected = b'{"a":[true,null,"\xc3\xbc",1.5,-0.0,{"y":[],"z":{}}],"b":1}'
        self.assertEqual(canonical_bytes(obj), expected)
        self.assertEqual(
            object_hash(obj),
            "25c92b8d7813e6e173ebd354035e001ec375398122ceb6fb717249e09e9d2ae9",
        )

    def test_key_order(self) -> None:
        """
        Insertion order of keys, at any level, does not change the bytes.
        """
        one = {"name": "www", "ip": "192.0.2.1", "meta": {"x": 1, "y": [{"q": 1, "p": 2}]}}
        two = {"meta": {"y": [{"p": 2, "q": 1}], "x": 1}, "ip": "192.0.2.1", "name": "www"}
        self.assertEqual(canonical_bytes(one), canonical_bytes(two))
        self.assertEqual(object_hash(one), object_hash(two))

    @given(json_objects)
    def test_key_order_property(self, obj: dict[str, Any]) -> None:
        """
        Any object hashes the same as itself with every key order reversed.
        """
        self.assertEqual(canonical_bytes(reorder(obj)), canonical_bytes(obj))

    @given(json_objects)
    def test_same_bytes_as_the_json_encoder(self, obj: dict[str, Any]) -> None:
        """
        Whichever encoder writes an object, the bytes are those of the
        definition: C{json.dumps} with sorted keys, no whitespace and raw
        non-ASCII text, in UTF-8.
        """
        self.assertEqual(canonical_bytes(obj), reference(obj))

    def test_every_character(self) -> None:
        """
        Every character that is not a surrogate is written as the JSON
        encoder writes it, in a value and in a key.
        """
        text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
        for obj in ({"v": text}, {text[:0x3000]: 1, text[0x3000:0x6000]: [text[-100:]]}):
            self.assertEqual(canonical_bytes(obj), reference(obj))

    def test_integers_at_64_bits(self) -> None:
        """
        Integers on both sides of 64 bits, where the faster encoder stops,
        are written as the JSON encoder writes them.
        """
        for n in (-(2**63) - 1, -(2**63), 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**100):
            obj = {"n": n, "list": [n, 1]}
            self.assertEqual(canonical_bytes(obj), reference(obj), n)

    def test_floats_as_python_writes_them(self) -> None:
        """
        Floats are written with Python's C{repr}, exponents included
        (C{1e-05}, not C{0.00001}; C{1e-07}, not C{1e-7}).
        """
        for x in (1e-05, 1e-07, 0.0001, 1e16, 1.5e300, 5e-324, -0.0, 0.1, 1.0):
            obj = {"x": x, "list": [x, 1]}
            self.assertEqual(canonical_bytes(obj), reference(obj), x)
        self.assertEqual(canonical_bytes({"x": 1e-05}), b'{"x":1e-05}')

    def test_keys_sorted_by_code_point(self) -> None:
        """
        Keys are sorted by code point, beyond the Basic Multilingual Plane
        too (where UTF-16 order would differ).
        """
        keys = ["\U0001f600", "\uffff", "\ue000", "\u2028", "é", "\x7f", "a", "A", ""]
        obj = {key: index for index, key in enumerate(keys)}
        self.assertEqual(canonical_bytes(obj), reference(obj))
        self.assertEqual(list(json.loads(canonical_bytes(obj))), sorted(keys))

    def test_subclasses_written_as_the_json_encoder_does(self) -> None:
        """
        A dict subclass is read through its C{items()} and a key of a str
        subclass is sorted with its own order, as the JSON encoder does.
        """

        class Items(dict):  # type: ignore[type-arg]
            def items(self):  # type: ignore[no-untyped-def]
                return [("z", 1)]

        class Backwards(str):
            def __lt__(self, other: object) -> bool:
                return str(other) < str(self)

        for obj in ({"a": Items(q=2)}, {Backwards("a"): 1, Backwards("b"): 2}):
            self.assertEqual(canonical_bytes(obj), reference(obj))
        self.assertEqual(canonical_bytes({"a": Items(q=2)}), b'{"a":{"z":1}}')

    def test_different_objects_differ(self) -> None:
        """
        Objects that JSON tells apart hash differently: a number and its
        text, an integer and a float, a boolean and an integer, a missing key
        and a null, and two orders of one list, nested or not.
        """
        variants = [
            {"a": 1},
            {"a": "1"},
            {"a": 1.0},
            {"a": True},
            {"a": None},
            {},
            {"a": [1, 2]},
            {"a": [2, 1]},
            {"a": {"b": [1, 2]}},
            {"a": {"b": [2, 1]}},
            {"a": {"b": {"c": 1}}},
            {"a": {"b": {"c": "1"}}},
            {"a": 0.0},
            {"a": -0.0},
        ]
        hashes = [object_hash(obj) for obj in variants]
        self.assertEqual(len(set(hashes)), len(variants))

    def test_integral_float_kept(self) -> None:
        """
        An integral float is written as a float, so it stays apart from the
        integer.
        """
        self.assertEqual(canonical_bytes({"n": 1.0}), b'{"n":1.0}')
        self.assertEqual(canonical_bytes({"n": 1}), b'{"n":1}')

    def test_subclasses(self) -> None:
        """
        Subclasses of the JSON types are written as their base type.
        """

        class Name(str):
            pass

        class Count(int):
            pass

        self.assertEqual(
            canonical_bytes({Name("k"): Count(3)}), canonical_bytes({"k": 3})
        )

    def test_not_an_object(self) -> None:
        """
        Only a dict can be a table object.
        """
        for value in [[1], "x", 1, None, True, (("a", 1),), b"{}"]:
            with self.assertRaises(InvalidObjectError) as raised:
                canonical_bytes(value)  # type: ignore[arg-type]
            self.assertIn("must be a JSON object", str(raised.exception))

    def test_key_not_string(self) -> None:
        """
        Keys must be strings at every level, and the message says where.
        """
        for obj in [{1: "a"}, {None: 1}, {True: 1}, {("a",): 1}]:
            with self.assertRaises(InvalidObjectError) as raised:
                canonical_bytes(obj)  # type: ignore[arg-type]
            self.assertIn("keys must be strings", str(raised.exception))
        with self.assertRaises(InvalidObjectError) as raised:
            canonical_bytes({"a": [0, {"b": {2: 3}}]})
        self.assertEqual(
            str(raised.exception),
            'keys must be strings, not int (2) (at $["a"][1]["b"])',
        )

    def test_not_finite(self) -> None:
        """
        NaN and the infinities are not JSON.
        """
        for bad, reason in [
            (math.nan, "NaN is not JSON"),
            (math.inf, "Infinity is not JSON"),
            (-math.inf, "Infinity is not JSON"),
        ]:
            with self.assertRaises(InvalidObjectError) as raised:
                canonical_bytes({"x": {"y": [1, bad]}})
            self.assertEqual(str(raised.exception), f'{reason} (at $["x"]["y"][1])')

    def test_other_types(self) -> None:
        """
        Tuples, sets, bytes and other Python values are rejected.
        """
        for bad, reason in [
            ((1, 2), "tuples are not accepted"),
            ({1}, "values of type set"),
            (b"x", "values of type bytes"),
            (object(), "values of type object"),
        ]:
            with self.assertRaises(InvalidObjectError) as raised:
                canonical_bytes({"v": bad})
            self.assertIn(reason, str(raised.exception))

    def test_depth(self) -> None:
        """
        MAX_DEPTH nested containers are accepted, one more is not; lists
        count as well as objects.
        """
        canonical_bytes(nested(MAX_DEPTH))
        with self.assertRaises(InvalidObjectError) as raised:
            canonical_bytes(nested(MAX_DEPTH + 1))
        self.assertIn(f"nested deeper than {MAX_DEPTH} levels", str(raised.exception))
        self.assertIn("...", str(raised.exception))
        deep_list: Any = []
        for _ in range(MAX_DEPTH - 1):
            deep_list = [deep_list]
        canonical_bytes({"a": deep_list[0]})
        with self.assertRaises(InvalidObjectError):
            canonical_bytes({"a": deep_list})

    def test_cycle(self) -> None:
        """
        A structure that contains itself is rejected, not followed forever.
        """
        obj: dict[str, Any] = {}
        obj["self"] = obj
        with self.assertRaises(InvalidObjectError):
            canonical_bytes(obj)

    def test_lone_surrogate(self) -> None:
        """
        A string that is not valid Unicode is rejected.
        """
        with self.assertRaises(InvalidObjectError) as raised:
            canonical_bytes({"s": "\ud800"})
        self.assertIn("surrogate", str(raised.exception))

    def test_error_is_value_error(self) -> None:
        """
        InvalidObjectError is a ValueError.
        """
        self.assertTrue(issubclass(InvalidObjectError, ValueError))


class HashTests(SynchronousTestCase):
    """
    L{hash_bytes}, L{object_hash} and L{is_hash}.
    """

    def test_hash_bytes(self) -> None:
        """
        hash_bytes is lowercase hex sha256.
        """
        self.assertEqual(
            hash_bytes(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )

    def test_object_hash(self) -> None:
        """
        object_hash hashes the canonical bytes.
        """
        obj = {"name": "www"}
        self.assertEqual(object_hash(obj), hash_bytes(b'{"name":"www"}'))

    def test_is_hash(self) -> None:
        """
        A hash is exactly 64 lowercase hex digits, as a str.
        """
        good = hash_bytes(b"x")
        self.assertTrue(is_hash(good))
        for bad in [
            good.upper(),
            good[:-1],
            good + "0",
            good + "\n",
            " " + good[1:],
            "g" + good[1:],
            good.encode("ascii"),
            None,
            64,
        ]:
            self.assertFalse(is_hash(bad), bad)


class DecodeObjectTests(SynchronousTestCase):
    """
    L{decode_object} accepts canonical bytes and nothing else.
    """

    @given(json_objects)
    @settings(max_examples=200)
    def test_round_trip(self, obj: dict[str, Any]) -> None:
        """
        Canonical bytes decode to an equal object that encodes to the same
        bytes.
        """
        data = canonical_bytes(obj)
        decoded = decode_object(data)
        self.assertEqual(decoded, obj)
        self.assertEqual(canonical_bytes(decoded), data)

    def test_round_trip_examples(self) -> None:
        """
        Non-ASCII text, escapes that are canonical, floats and big integers
        survive.
        """
        for obj in [
            {},
            {"ü": "snow ☃ \U0001f600", "q": 'a"b\\c\n\t\x00\x7f'},
            {"f": [0.1, -0.0, 1e300, 5e-324, 1e16], "i": 2**200, "n": -(2**70)},
            {"\u2028": "\u2029"},
        ]:
            data = canonical_bytes(obj)
            self.assertEqual(decode_object(data), obj)

    def assertRejected(self, data: bytes, reason: str) -> None:
        with self.assertRaises(InvalidObjectError) as raised:
            decode_object(data)
        self.assertIn(reason, str(raised.exception))

    def test_not_canonical(self) -> None:
        """
        JSON that means the same object but is written another way is
        rejected.
        """
        for data in [
            b'{"a": 1}',
            b'{ "a":1}',
            b'{"a":1}\n',
            b' {"a":1}',
            b'{"b":1,"a":2}',
            b'{"a":{"d":1,"c":2}}',
            b'{"a":"\\u00fc"}',
            b'{"a":"\\u00FC"}',
            b'{"a":"\\/"}',
            b'{"a":"\\ud83d\\ude00"}',
            b'{"a":1e2}',
            b'{"a":100.00}',
            b'{"a":1E+2}',
            b'{"a":-0}',
            b'{"a":1,"a":1}',
            b'{"a":1,"a":2}',
        ]:
            self.assertRejected(data, "not canonical")

    def test_canonical_variants_accepted(self) -> None:
        """
        The escapes the canonical form itself uses are accepted.
        """
        self.assertEqual(decode_object(b'{"a":"\\"\\\\\\n\\u0000"}'), {"a": '"\\\n\x00'})
        self.assertEqual(
            decode_object('{"a":"\xfc"}'.encode("utf-8")), {"a": "\xfc"}
        )

    def test_not_json(self) -> None:
        """
        Bytes that are not JSON are rejected, including NaN and Infinity and
        numbers too large for a float.
        """
        for data, reason in [
            (b"", "not JSON"),
            (b"{", "not JSON"),
            (b'{"a":1}x', "not JSON"),
            (b'{"a":NaN}', "NaN is not JSON"),
            (b'{"a":-Infinity}', "Infinity is not JSON"),
            (b'{"a":1e400}', "cannot be written as JSON"),
            (b"\xef\xbb\xbf{}", "not JSON"),
            ("{}".encode("utf-32-le"), "not JSON"),
        ]:
            self.assertRejected(data, reason)

    def test_not_utf8(self) -> None:
        """
        Only UTF-8 is accepted: other encodings and encoded surrogates are
        not.
        """
        for data in [
            "{}".encode("utf-16"),
            b'{"a":"\xff"}',
            b'{"a":"\xed\xa0\x80"}',
        ]:
            self.assertRejected(data, "UTF-8")

    def test_lone_surrogate_escape(self) -> None:
        """
        An escaped lone surrogate has no canonical form.
        """
        self.assertRejected(b'{"a":"\\ud800"}', "not canonical")

    def test_not_an_object(self) -> None:
        """
        Only a JSON object is a table object.
        """
        for data in [b"[]", b"1", b'"a"', b"null", b"true"]:
            self.assertRejected(data, "must be a JSON object")

    def test_depth(self) -> None:
        """
        The depth limit applies to received bytes too, including JSON nested
        far beyond what the parser can follow.
        """
        self.assertEqual(
            decode_object(canonical_bytes(nested(MAX_DEPTH))), nested(MAX_DEPTH)
        )
        too_deep = json.dumps(nested(MAX_DEPTH + 1), separators=(",", ":"))
        self.assertRejected(too_deep.encode("ascii"), "nested deeper")
        lists = b'{"a":' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}"
        self.assertRejected(lists, "nested deeper")
        huge = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        self.assertRejected(huge, "nested deeper")

    def test_brackets_in_strings(self) -> None:
        """
        Brackets inside strings do not count as nesting.
        """
        obj = {"a": "{[" * (MAX_DEPTH * 2)}
        self.assertEqual(decode_object(canonical_bytes(obj)), obj)

    def test_not_bytes(self) -> None:
        """
        Text must be encoded first.
        """
        with self.assertRaises(InvalidObjectError):
            decode_object('{"a":1}')  # type: ignore[arg-type]

    def test_hash_of_received_bytes(self) -> None:
        """
        The hash of accepted bytes is the hash of the decoded object.
        """
        data = b'{"ip":"192.0.2.1","name":"www"}'
        self.assertEqual(hash_bytes(data), object_hash(decode_object(data)))
