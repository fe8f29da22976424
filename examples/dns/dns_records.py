"""
DNS records as table objects, and the zone file an operator edits.

A record travels through the table as one JSON object:

    {"type": "dns-record", "name": "www.example.test", "rtype": "A",
     "ttl": 60, "data": "192.0.2.1"}

Names are absolute, lower case and without the final dot; ``data`` is the
record's value in its usual text form ("10 mail.example.test" for MX). This
module checks and normalises records, reads zone files and turns a record
into a twisted.names payload. It knows nothing of the network or the table.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from typing import Any

import attrs
from twisted.names import dns

#: The "type" of the table objects that are DNS records.
RECORD_TYPE = "dns-record"
#: The record types a zone may hold.
RTYPES = ("A", "AAAA", "MX", "TXT", "CNAME")
#: The TTL of records whose line gives none and no $TTL came before.
DEFAULT_TTL = 3600
MAX_TTL = 2**31 - 1
#: A character-string in a TXT record holds at most this many bytes; longer
#: text is split into several, as the DNS requires.
TXT_CHUNK = 255

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class RecordError(ValueError):
    """
    A record or a zone file is not valid; C{str()} says why, for an operator.
    """


@attrs.frozen
class Record:
    """
    One normalised DNS record; equal records are the same table object.
    """

    name: str
    rtype: str
    ttl: int
    data: str

    def to_object(self) -> dict[str, Any]:
        """
        The table object that carries this record.
        """
        return {"type": RECORD_TYPE, "name": self.name, "rtype": self.rtype,
                "ttl": self.ttl, "data": self.data}

    def text(self) -> str:
        """
        The record as one line, for people; TXT data is quoted as in a zone
        file, since it may hold spaces.
        """
        data = self.data
        if self.rtype == "TXT":
            escaped = data.replace("\\", "\\\\").replace('"', '\\"')
            data = f'"{escaped}"'
        return f"{self.name} {self.ttl} {self.rtype} {data}"

    def payload(self) -> dns.IEncodableRecord:
        """
        The twisted.names record that answers for this one.
        """
        if self.rtype == "A":
            return dns.Record_A(self.data, self.ttl)
        if self.rtype == "AAAA":
            return dns.Record_AAAA(self.data, self.ttl)
        if self.rtype == "MX":
            preference, exchange = self.data.split(" ")
            return dns.Record_MX(int(preference), exchange.encode("ascii"), self.ttl)
        if self.rtype == "CNAME":
            return dns.Record_CNAME(self.data.encode("ascii"), self.ttl)
        raw = self.data.encode("utf-8")
        chunks = [raw[i:i + TXT_CHUNK] for i in range(0, len(raw), TXT_CHUNK)] or [b""]
        return dns.Record_TXT(*chunks, ttl=self.ttl)


def normalise_name(text: str, zone: str | None = None) -> str:
    """
    An absolute domain name in the form records use. With C{zone}, a name
    without a final dot is relative to it and C{"@"} is the zone itself.

    @raise RecordError: if C{text} is not a host-style domain name.
    """
    if zone is not None:
        if text == "@":
            return zone
        if not text.endswith("."):
            text = f"{text}.{zone}"
    name = text.lower().rstrip(".") if text != "." else ""
    if not name:
        raise RecordError("the root name is not a record name here")
    if not name.isascii():
        raise RecordError(f"{text!r} is not ASCII; write international names in "
                          "their xn-- form")
    if len(name) > 253:
        raise RecordError(f"{text!r} is longer than 253 characters")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise RecordError(f"{text!r} is not a valid domain name (bad label {label!r})")
    return name


def in_zone(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def _ttl(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TTL:
        raise RecordError(f"TTL must be a whole number of seconds from 0 to {MAX_TTL}, "
                          f"not {value!r}")
    return value


def _data(rtype: str, text: str, zone: str | None) -> str:
    """
    The normalised text of a record's value; names in it are relative to
    C{zone} when one is given.
    """
    try:
        if rtype == "A":
            return str(ipaddress.IPv4Address(text))
        if rtype == "AAAA":
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise RecordError(f"{text!r} is not an IPv{4 if rtype == 'A' else 6} address")
    if rtype == "MX":
        parts = text.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) > 65535:
            raise RecordError(f"MX data must be 'PREFERENCE HOST' with a preference "
                              f"from 0 to 65535, not {text!r}")
        return f"{int(parts[0])} {normalise_name(parts[1], zone)}"
    if rtype == "CNAME":
        return normalise_name(text, zone)
    return text


def make_record(name: str, rtype: str, ttl: Any, data: str, zone: str,
                origin: str | None = None) -> Record:
    """
    A checked, normalised record of C{zone}. With C{origin}, relative names
    (in C{name} and in C{data}) are relative to it, as in a zone file.

    @raise RecordError: if any part is not valid or the name is outside
        C{zone}.
    """
    rtype = rtype.upper()
    if rtype not in RTYPES:
        raise RecordError(f"record type {rtype!r} is not supported; use one of "
                          f"{', '.join(RTYPES)}")
    record = Record(name=normalise_name(name, origin), rtype=rtype, ttl=_ttl(ttl),
                    data=_data(rtype, data, origin))
    if not in_zone(record.name, zone):
        raise RecordError(f"{record.name} is outside the zone {zone}")
    return record


def record_from_object(obj: dict[str, Any], zone: str) -> Record:
    """
    The record a table object carries.

    @raise RecordError: if C{obj} is not a valid record of C{zone}.
    """
    for field, kind in (("name", str), ("rtype", str), ("data", str)):
        if not isinstance(obj.get(field), kind):
            raise RecordError(f"field {field!r} must be a string")
    return make_record(obj["name"], obj["rtype"], obj.get("ttl"), obj["data"], zone)


def _tokens(line: str) -> list[str]:
    """
    A zone file line split into fields: double quotes group words, a
    backslash escapes the next character, ";" starts a comment.
    """
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ";"
    lexer.quotes = '"'
    lexer.escapedquotes = '"'
    try:
        return list(lexer)
    except ValueError as e:
        raise RecordError(str(e).lower())


def _record_line(tokens: list[str], default_ttl: int, zone: str) -> Record:
    """
    A record from the fields of one line: C{NAME [TTL] [IN] TYPE DATA...}.
    """
    name, rest = tokens[0], tokens[1:]
    ttl: Any = default_ttl
    if rest and rest[0].isdigit():
        ttl, rest = rest[0], rest[1:]
    if rest and rest[0].upper() == "IN":
        rest = rest[1:]
    if len(rest) < 2:
        raise RecordError("expected NAME [TTL] [IN] TYPE DATA")
    rtype, data = rest[0].upper(), rest[1:]
    if rtype in RTYPES and rtype != "TXT" and len(data) != (2 if rtype == "MX" else 1):
        raise RecordError(f"unexpected data for {rtype}: {' '.join(data)!r}")
    return make_record(name, rtype, ttl, " ".join(data), zone, origin=zone)


def _check_zone(records: set[Record]) -> None:
    """
    The rules that span records: a CNAME stands alone at its name, and the
    records of one name and type share one TTL.
    """
    by_name: dict[str, list[Record]] = {}
    for record in sorted(records, key=lambda r: (r.name, r.rtype, r.data)):
        by_name.setdefault(record.name, []).append(record)
    for name, group in by_name.items():
        if any(r.rtype == "CNAME" for r in group) and len(group) > 1:
            raise RecordError(f"{name} has a CNAME and other records; a CNAME must "
                              "be the only record of its name")
        for rtype in {r.rtype for r in group}:
            ttls = {r.ttl for r in group if r.rtype == rtype}
            if len(ttls) > 1:
                raise RecordError(f"the {rtype} records of {name} have different TTLs "
                                  f"({', '.join(map(str, sorted(ttls)))}); give them one")


def parse_zone(text: str, zone: str, source: str = "zone file") -> set[Record]:
    """
    The records of a zone file. Each line is C{NAME [TTL] [IN] TYPE DATA};
    names without a final dot are relative to C{zone} and C{@} is the zone
    itself; C{$TTL SECONDS} sets the TTL of the lines after it.

    @raise RecordError: naming C{source} and the line, for the first bad
        line, or for records that cannot stand together.
    """
    records: set[Record] = set()
    default_ttl = DEFAULT_TTL
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            tokens = _tokens(line)
            if not tokens:
                continue
            if tokens[0].upper() == "$TTL":
                if len(tokens) != 2:
                    raise RecordError("expected $TTL SECONDS")
                default_ttl = _ttl(tokens[1])
            elif tokens[0].startswith("$"):
                raise RecordError(f"unknown directive {tokens[0]}")
            else:
                records.add(_record_line(tokens, default_ttl, zone))
        except RecordError as e:
            raise RecordError(f"{source} line {number}: {e}") from None
    try:
        _check_zone(records)
    except RecordError as e:
        raise RecordError(f"{source}: {e}") from None
    return records
