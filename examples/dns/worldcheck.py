"""
World-valid DNS lookups: one node asks every online node to resolve a name
with its own resolver, collects the answers and says whether all locations
agree, for instance on a domain's MX records before sending mail there.

    python examples/dns/worldcheck.py node --name paris --port 10000
    python examples/dns/worldcheck.py node --name tokyo --port 10001 \\
        --peer 127.0.0.1:10000
    python examples/dns/worldcheck.py ask --name here --port 0 \\
        --peer 127.0.0.1:10000 example.com MX

A node answers every query it receives; the asker prints each location's
answer and a verdict, and exits 0 only if every location that answered gives
the same answer (and, with --expect, that many nodes answered). The queries
and answers are dtable messages: they reach every online node, so each side
ignores what is not for it, and the asker waits at most --timeout seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from typing import Any

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.task import react
from twisted.names import client, dns, error

from dns_node import Node, add_node_arguments, check_node_arguments, complain, \
    make_table, report_links, say, when_linked
from dns_records import RecordError, normalise_name
from dtable.interfaces import TableObserver
from dtable.service import DistributedTable

QUERY = "dns-query"
ANSWER = "dns-answer"
#: The record types a query may ask for.
RTYPES = ("A", "AAAA", "MX", "TXT", "CNAME", "NS")
#: Seconds before a lookup is sent again, then given up: a node answers
#: well within the asker's default --timeout.
LOOKUP_TIMEOUT = (1, 3)
#: Bounds on what an answer may carry, against a confused or hostile node.
MAX_RECORDS = 100
MAX_TEXT = 1000
#: What a failed lookup is reported as, most specific first.
ERRORS = (
    (error.DNSNameError, "NXDOMAIN"),
    (error.DNSQueryRefusedError, "REFUSED"),
    (error.DNSServerError, "SERVFAIL"),
    (error.DNSFormatError, "FORMERR"),
    (error.DNSNotImplementedError, "NOTIMP"),
    (TimeoutError, "timeout"),
)


@attrs.frozen
class Query:
    """
    A lookup that one node asks of every node.
    """

    id: str
    name: str
    rtype: str
    origin: str

    def to_message(self) -> dict[str, Any]:
        return {"type": QUERY, "id": self.id, "name": self.name, "rtype": self.rtype,
                "from": self.origin}


def parse_query(message: dict[str, Any]) -> Query:
    """
    @raise ValueError: if C{message} is not a well-formed query.
    """
    fields = {field: message.get(key) for field, key in
              (("id", "id"), ("name", "name"), ("rtype", "rtype"), ("origin", "from"))}
    for field, value in fields.items():
        if not isinstance(value, str) or not 0 < len(value) <= 253:
            raise ValueError(f"its {field!r} is not a short string")
    if fields["rtype"] not in RTYPES:
        raise ValueError(f"record type {fields['rtype']!r} is not one of {', '.join(RTYPES)}")
    fields["name"] = normalise_name(fields["name"])
    return Query(**fields)


@attrs.frozen
class Outcome:
    """
    What one resolver said: the records (as sorted text), or an error.
    """

    records: tuple[str, ...] = ()
    error: str | None = None

    @property
    def failed(self) -> bool:
        """
        Whether the lookup got no answer at all. NXDOMAIN is an answer: that
        the name does not exist.
        """
        return self.error is not None and self.error != "NXDOMAIN"

    def text(self) -> str:
        if self.error is not None:
            return f"error: {self.error}"
        return ", ".join(self.records) if self.records else "(no records)"


@attrs.frozen
class Answer:
    """
    One location's outcome for a query.
    """

    node: str
    location: str
    outcome: Outcome


def answer_message(query: Query, node: str, location: str, outcome: Outcome) -> dict:
    message = {"type": ANSWER, "id": query.id, "to": query.origin, "node": node,
               "location": location}
    if outcome.error is not None:
        message["error"] = outcome.error
    else:
        message["answers"] = list(outcome.records)
    return message


def _short_text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT


def parse_answer(message: dict[str, Any], query_id: str) -> Answer | None:
    """
    The answer C{message} carries to the query C{query_id}; None if it
    answers another query or is malformed.
    """
    if message.get("type") != ANSWER or message.get("id") != query_id:
        return None
    node, location = message.get("node"), message.get("location")
    if not (_short_text(node) and _short_text(location)):
        return None
    if "error" in message:
        if not _short_text(message["error"]):
            return None
        return Answer(node, location, Outcome(error=message["error"]))
    records = message.get("answers")
    if (not isinstance(records, list) or len(records) > MAX_RECORDS
            or not all(_short_text(r) for r in records)):
        return None
    return Answer(node, location, Outcome(records=tuple(sorted(records))))


def record_text(rtype: str, payload: Any) -> str:
    """
    A record's value without its TTL, which differs between caches.
    """
    if rtype == "A":
        return payload.dottedQuad()
    if rtype == "AAAA":
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    if rtype == "MX":
        return f"{payload.preference} {str(payload.name).lower()}"
    if rtype == "TXT":
        return " ".join(json.dumps(part.decode("utf-8", "replace"), ensure_ascii=False)
                        for part in payload.data)
    return str(payload.name).lower()


async def resolve(resolver: Any, name: str, rtype: str) -> Outcome:
    """
    Look C{name} up with C{resolver}; CNAMEs met on the way are reported
    with the records.
    """
    query = dns.Query(name, getattr(dns, rtype), dns.IN)
    try:
        answers, _, _ = await resolver.query(query, timeout=LOOKUP_TIMEOUT)
    except Exception as e:
        for kind, text in ERRORS:
            if isinstance(e, kind):
                return Outcome(error=text)
        return Outcome(error=f"{type(e).__name__}: {e}")
    records = []
    for record in answers:
        kind = dns.QUERY_TYPES.get(record.type)
        if kind == rtype:
            records.append(record_text(rtype, record.payload))
        elif kind == "CNAME":
            records.append(f"CNAME {record_text(kind, record.payload)}")
    return Outcome(records=tuple(sorted(records)))


class Responder(TableObserver):
    """
    Answers every query from another node with this node's resolver.
    """

    def __init__(self, table: DistributedTable, resolver: Any, location: str) -> None:
        self._table = table
        self._resolver = resolver
        self._location = location

    def message_received(self, msg: object) -> None:
        if not isinstance(msg, dict) or msg.get("type") != QUERY:
            return
        try:
            query = parse_query(msg)
        except (ValueError, RecordError) as e:
            complain(f"ignoring a malformed query: {e}")
            return
        answering = Deferred.fromCoroutine(self._answer(query))
        answering.addErrback(lambda f: complain(f"cannot answer: {f.getErrorMessage()}"))

    async def _answer(self, query: Query) -> None:
        outcome = await resolve(self._resolver, query.name, query.rtype)
        if not self._table.running:
            return
        self._table.send_message(answer_message(query, self._table.node_id,
                                                self._location, outcome))
        say(f"answered {query.name} {query.rtype} for {query.origin[:8]}: {outcome.text()}")


class Collector(TableObserver):
    """
    Gathers the answers to one query, one per node, and fires C{complete}
    once C{expect} other nodes answered.
    """

    def __init__(self, query_id: str, expect: int | None) -> None:
        self._query_id = query_id
        self._expect = expect
        self.answers: dict[str, Answer] = {}
        self.complete: Deferred = Deferred()

    def message_received(self, msg: object) -> None:
        answer = parse_answer(msg, self._query_id) if isinstance(msg, dict) else None
        if answer is None or answer.node in self.answers:
            return
        self.answers[answer.node] = answer
        if (self._expect is not None and len(self.answers) >= self._expect
                and not self.complete.called):
            self.complete.callback(None)


def _labels(answers: list[Answer]) -> dict[str, str]:
    """
    How to call each node in the report: its location name, with its node id
    when two nodes share a name.
    """
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer.location] = counts.get(answer.location, 0) + 1
    return {a.node: a.location if counts[a.location] == 1 else f"{a.location} ({a.node[:8]})"
            for a in answers}


def verdict(own: Answer, remote: list[Answer], expect: int | None) -> tuple[int, list[str]]:
    """
    The report: one line per location, then the verdict. Returns the exit
    status (0 only if every location got the same answer and enough nodes
    answered) and the lines.
    """
    answers = [own, *remote]
    labels = _labels(answers)
    lines = [f"{labels[a.node]}: {a.outcome.text()}"
             for a in sorted(answers, key=lambda a: labels[a.node])]
    groups: dict[Outcome, list[str]] = {}
    for answer in answers:
        groups.setdefault(answer.outcome, []).append(labels[answer.node])
    if not remote:
        return 1, [*lines, "verdict: no other node answered; nothing to compare"]
    if len(groups) > 1:
        ranked = sorted(groups.values(), key=len, reverse=True)
        if len(ranked[0]) == len(ranked[1]):
            sides = " | ".join(", ".join(sorted(names)) for names in ranked)
            return 1, [*lines, f"verdict: DISAGREE, no majority: {sides}"]
        differing = sorted(name for names in ranked[1:] for name in names)
        verb = "differs" if len(differing) == 1 else "differ"
        return 1, [*lines, f"verdict: DISAGREE: {', '.join(differing)} {verb} from "
                           f"the majority ({', '.join(sorted(ranked[0]))})"]
    if own.outcome.failed:
        return 1, [*lines, f"verdict: FAILED: the lookup failed everywhere "
                           f"({own.outcome.text()})"]
    if expect is not None and len(remote) < expect:
        return 1, [*lines, f"verdict: INCOMPLETE: only {len(remote)} of {expect} "
                           "expected nodes answered (those agree)"]
    return 0, [*lines, f"verdict: AGREE: all {len(answers)} locations give the same answer"]


def make_resolver(text: str | None, reactor: Any) -> Any:
    """
    A resolver that asks only the server C{text} (C{HOST[:PORT]}), or the
    system's servers when it is None.
    """
    if text is None:
        return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return client.Resolver(servers=[parse_server(text)], reactor=reactor)


def parse_server(text: str) -> tuple[str, int]:
    """
    C{"192.0.2.53"}, C{"192.0.2.53:5353"}, C{"[2001:db8::53]:53"} as
    (host, port); port 53 unless given.

    @raise ValueError: for anything else.
    """
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not HOST[:PORT]")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    address = ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{port!r} is not a port number")
    return str(address), int(port)


async def serve(reactor: Any, args: argparse.Namespace, key: str) -> None:
    table = make_table(args, key, False, reactor)
    report_links(table)
    table.subscribe(Responder(table, make_resolver(args.resolver, reactor), args.name))
    node = Node(table, reactor, f"worldcheck {args.name}")
    await node.start()
    await node.run_forever()


async def ask(reactor: Any, args: argparse.Namespace, key: str) -> None:
    table = make_table(args, key, False, reactor)
    node = Node(table, reactor, f"worldcheck {args.name}")
    query = Query(id=os.urandom(16).hex(), name=args.domain, rtype=args.rtype,
                  origin=table.node_id)
    collector = Collector(query.id, args.expect)
    table.subscribe(collector)
    await node.start()
    deadline = reactor.seconds() + args.timeout
    try:
        await when_linked(table, reactor, args.timeout)
    except TimeoutError:
        say(f"verdict: no node reachable within {args.timeout:g} s")
        await node.stop()
        raise SystemExit(1)
    table.send_message(query.to_message())
    say(f"asked every online node: {query.name} {query.rtype}")
    own = Answer(table.node_id, args.name,
                 await resolve(make_resolver(args.resolver, reactor), query.name,
                               query.rtype))
    try:
        await collector.complete.addTimeout(max(deadline - reactor.seconds(), 0), reactor)
    except TimeoutError:
        pass
    status, lines = verdict(own, list(collector.answers.values()), args.expect)
    for line in lines:
        say(line)
    await node.stop()
    if status:
        raise SystemExit(status)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Ask every online dtable node to resolve a name and say whether "
                    "all locations agree.")
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
    node = roles.add_parser("node", help="answer queries with this node's resolver",
                            description="Answer every query with this node's resolver.")
    query = roles.add_parser("ask", help="ask every online node, then give a verdict",
                             description="Ask every online node to resolve a name; "
                                         "exit 0 if all agree, 1 if not.")
    for sub, port in ((node, 9999), (query, 0)):
        sub.add_argument("--name", default=socket.gethostname(),
                         help="this location's name in reports (default: the host name)")
        sub.add_argument("--resolver", metavar="HOST[:PORT]",
                         help="the DNS server to ask (default: the system's, "
                              "from /etc/resolv.conf)")
        add_node_arguments(sub, default_port=port)
    query.add_argument("domain", help="the name to look up")
    query.add_argument("rtype", nargs="?", default="MX", type=str.upper,
                       help=f"the record type: {', '.join(RTYPES)} (default: %(default)s)")
    query.add_argument("--timeout", type=float, default=6.0,
                       help="seconds to wait for answers (default: %(default)s)")
    query.add_argument("--expect", type=int,
                       help="the number of other nodes that should answer: stop "
                            "waiting once they have, and fail if fewer do")
    return parser


def main(argv: list[str]) -> None:
    arguments = parser()
    args = arguments.parse_args(argv)
    key = check_node_arguments(arguments, args)
    if args.resolver is not None:
        try:
            parse_server(args.resolver)
        except ValueError as e:
            arguments.error(f"--resolver: {e}")
    if args.role == "ask":
        _check_ask(arguments, args)
    react(serve if args.role == "node" else ask, (args, key))


def _check_ask(arguments: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.peer:
        arguments.error("ask needs --peer: a node of the network to ask through")
    if args.rtype not in RTYPES:
        arguments.error(f"record type {args.rtype!r} is not one of {', '.join(RTYPES)}")
    try:
        args.domain = normalise_name(args.domain)
    except RecordError as e:
        arguments.error(str(e))
    if not args.timeout > 0:
        arguments.error(f"--timeout must be greater than 0, not {args.timeout:g}")
    if args.expect is not None and args.expect < 1:
        arguments.error(f"--expect must be at least 1, not {args.expect}")


if __name__ == "__main__":
    main(sys.argv[1:])
