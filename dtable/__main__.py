"""
The dtable command line.

    python -m dtable keygen [--output FILE]    print (or write) a new network key
    python -m dtable master-keygen --output FILE
                                               write a new master key, print its
                                               public half
    python -m dtable master-public-key FILE    print a master key's public half
    python -m dtable api-token --output FILE   write a new control API token
    python -m dtable demo [--nodes N] [--objects K]
                                               run a small network in this process

A running node's control API (C{twistd dtable --api ...}), through
L{dtable.client}:

    python -m dtable add [JSON|-] [--wait]     add an object, or each of a list
                                               (JSON from stdin when - or absent)
    python -m dtable remove HASH [--wait]      remove an object
    python -m dtable list [--limit N]          every object, one JSON line each:
                                               {"hash": ..., "object": ...}
    python -m dtable get HASH                  one object, as a JSON line
    python -m dtable send [JSON|-]             send a message to every node online
    python -m dtable watch [--snapshot] [--count N]
                                               follow the events, one JSON line
                                               each: {"event": ..., "data": ...}
    python -m dtable status                    the node's status, indented JSON
    python -m dtable metrics                   the node's Prometheus metrics

They take C{--api URL} (default: C{$DTABLE_API}, else http://127.0.0.1:8080)
and C{--token-file FILE} (default: C{$DTABLE_TOKEN_FILE}, else the token in
C{$DTABLE_TOKEN}). Answers go to stdout as JSON, messages to stderr.

Exit codes: 0 on success, 1 when the command itself fails (the demo did not
converge, the key file exists, the node cannot be reached, refuses the
token or answers an HTTP error), 2 for a usage error (a bad option, JSON
that does not parse, no token). Nodes are run as daemons with
C{twistd dtable}; see C{twistd dtable --help}.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from typing import IO, Any, Callable, NoReturn, Sequence

from dtable import crypto, demo
from dtable.client import DEFAULT_API, PAGE_SIZE, ApiClient, ApiClientError, api_url

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

class _UsageError(Exception):
    """
    A command line that cannot be run as given (exit code 2).
    """


class _Parser(argparse.ArgumentParser):
    """
    An argument parser that writes its help and errors to the streams of
    one run of L{main}, not to sys.stdout and sys.stderr.
    """

    def __init__(self, *args: Any, out: IO[str], err: IO[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out = out
        self.err = err

    def print_usage(self, file: IO[str] | None = None) -> None:
        super().print_usage(file or self.out)

    def print_help(self, file: IO[str] | None = None) -> None:
        super().print_help(file or self.out)

    def error(self, message: str) -> NoReturn:
        self.print_usage(self.err)
        self.err.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _client_options() -> argparse.ArgumentParser:
    """
    The options every command that talks to a node shares.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api", metavar="URL", default=os.environ.get("DTABLE_API") or DEFAULT_API,
        help="the node's control API: a URL, HOST:PORT or a port on 127.0.0.1 "
             f"(default: $DTABLE_API, else {DEFAULT_API})")
    common.add_argument(
        "--token-file", metavar="FILE", default=os.environ.get("DTABLE_TOKEN_FILE") or None,
        help="file holding the API's token, as given to the node with "
             "--api-token-file (default: $DTABLE_TOKEN_FILE, else the token in "
             "$DTABLE_TOKEN)")
    return common


def _parser(out: IO[str], err: IO[str]) -> _Parser:
    parser = _Parser(
        prog="python -m dtable", out=out, err=err,
        description="An encrypted, replicated table of JSON objects. "
                    "Run a node with: twistd -n dtable --key-file net.key ...")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> _Parser:
        return commands.add_parser(name, out=out, err=err, **kwargs)

    keygen = command(
        "keygen", help="make a new network key",
        description="Print a new random network key. Every node of one network "
                    "needs the same key; keep it secret.")
    keygen.add_argument(
        "-o", "--output", metavar="FILE",
        help="write the key to FILE, readable by its owner only, instead of "
             "printing it; FILE must not exist")

    master_keygen = command(
        "master-keygen", help="make a separate master key pair",
        description="Write the private half of a new master key pair to FILE "
                    "(readable by its owner only; give it to the master with "
                    "--master-key-file) and print its public half (give it to "
                    "every other node with --master-public-key). With it, "
                    "holding the network key is not enough to change the table.")
    master_keygen.add_argument(
        "-o", "--output", metavar="FILE", required=True,
        help="where to write the private key; FILE must not exist")

    master_public = command(
        "master-public-key", help="print the public half of a master key",
        description="Print the public half of the master key in FILE, for "
                    "--master-public-key.")
    master_public.add_argument("file", metavar="FILE")

    api_token = command(
        "api-token", help="make a bearer token for the control API",
        description="Write a new random token for the control API to FILE "
                    "(readable by its owner only); give it to the node with "
                    "--api-token-file and to its clients.")
    api_token.add_argument(
        "-o", "--output", metavar="FILE", required=True,
        help="where to write the token; FILE must not exist")

    demo_parser = command(
        "demo", help="run a small network of nodes in this process",
        description="Start a few nodes on 127.0.0.1, let the master add and "
                    "remove objects and one node send a message, then print "
                    "what replicated where. Exits 0 once every node holds the "
                    "master's table and got the message, 1 if that takes longer "
                    f"than {demo.DEFAULT_TIMEOUT:g} seconds.")
    demo.add_arguments(demo_parser)

    _add_client_commands(command, _client_options())
    return parser


def _add_client_commands(command: Callable[..., _Parser],
                         common: argparse.ArgumentParser) -> None:
    wait_help = "answer only once the change is published (the answer then has its \"rev\")"
    add = command(
        "add", parents=[common], help="add objects to the table (on the master)",
        description="Add a JSON object to the table, or every object of a JSON "
                    "list. Prints the node's answer: {\"hash\": ...} or "
                    "{\"hashes\": [...]}. Only the master accepts changes.")
    add.add_argument("json", metavar="JSON", nargs="?", default="-",
                     help="the object or list; - or nothing reads it from stdin")
    add.add_argument("--wait", action="store_true", help=wait_help)

    remove = command(
        "remove", parents=[common], help="remove an object (on the master)",
        description="Remove the object with this hash. Prints {\"hash\": ...}.")
    remove.add_argument("hash", metavar="HASH")
    remove.add_argument("--wait", action="store_true", help=wait_help)

    listing = command(
        "list", parents=[common], help="print every object of the table",
        description="Print every object of the table, in hash order, one JSON "
                    "line each: {\"hash\": ..., \"object\": ...}. Reads the table "
                    "a page at a time.")
    listing.add_argument("--limit", metavar="N", type=_positive, default=PAGE_SIZE,
                         help="objects per page (the node allows up to 10000; "
                              "default %(default)s)")

    get = command(
        "get", parents=[common], help="print one object",
        description="Print the object with this hash as one JSON line; exits 1 "
                    "if the table does not hold it.")
    get.add_argument("hash", metavar="HASH")

    send = command(
        "send", parents=[common], help="send a message to every node online",
        description="Send any JSON value (quote strings: '\"hello\"') to every "
                    "node online. Prints {\"id\": ...}.")
    send.add_argument("json", metavar="JSON", nargs="?", default="-",
                      help="the message; - or nothing reads it from stdin")

    watch = command(
        "watch", parents=[common], help="follow the node's events",
        description="Print the node's events as they happen, one JSON line "
                    "each: {\"event\": NAME, \"data\": ...}, NAME one of "
                    "object_added, object_removed, message_received, error, ready. "
                    "Ctrl-C ends it; exits 1 if the node ends the stream.")
    watch.add_argument("--snapshot", action="store_true",
                       help="start with the whole table (object_added events) and "
                            "a ready event")
    watch.add_argument("--count", metavar="N", type=_positive,
                       help="exit 0 after N events (the snapshot's and ready count)")

    command("status", parents=[common], help="print the node's status",
            description="Print the node's status (links, overlay, firewall, "
                        "traffic) as indented JSON.")
    command("metrics", parents=[common], help="print the node's metrics",
            description="Print the node's metrics in the Prometheus text format.")


# Keys and tokens ------------------------------------------------------------------------


def _write_secret(command: str, output: str, text: str, err: IO[str]) -> bool:
    """
    Create C{output}, readable by its owner only, holding C{text}; False
    (with the reason on C{err}) if it exists or cannot be made.
    """
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"python -m dtable {command}: cannot create {output}: {e.strerror}",
              file=err)
        return False
    with os.fdopen(fd, "w", encoding="ascii") as key_file:
        key_file.write(text + "\n")
    return True


def _keygen(output: str | None, out: IO[str], err: IO[str]) -> int:
    key = crypto.generate_network_key()
    if output is None:
        print(key, file=out, flush=True)
        return EXIT_OK
    return EXIT_OK if _write_secret("keygen", output, key, err) else EXIT_FAILED


def _master_keygen(output: str, out: IO[str], err: IO[str]) -> int:
    text = crypto.generate_master_key()
    if not _write_secret("master-keygen", output, text, err):
        return EXIT_FAILED
    print(crypto.public_key_hex(crypto.parse_master_key(text)), file=out, flush=True)
    return EXIT_OK


def _master_public_key(path: str, out: IO[str], err: IO[str]) -> int:
    try:
        key = crypto.load_master_key(path)
    except crypto.MasterKeyError as e:
        print(f"python -m dtable master-public-key: {e}", file=err)
        return EXIT_FAILED
    print(crypto.public_key_hex(key), file=out, flush=True)
    return EXIT_OK


# The API's client ------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> str:
    """
    The API token: from --token-file (or $DTABLE_TOKEN_FILE), else
    $DTABLE_TOKEN.
    """
    path = args.token_file
    if path:
        try:
            with open(path, encoding="utf-8") as token_file:
                token = token_file.read().strip()
        except OSError as e:
            raise _UsageError(f"cannot read the token file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise _UsageError(f"the token file {path} is not text") from None
        if not token:
            raise _UsageError(f"the token file {path} is empty")
        return token
    token = os.environ.get("DTABLE_TOKEN", "").strip()
    if not token:
        raise _UsageError("no token: give --token-file FILE (the node's --api-token-file), "
                         "or set DTABLE_TOKEN_FILE or DTABLE_TOKEN")
    return token


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_input(text: str, stdin: IO[str], quote_hint: bool = False) -> Any:
    """
    The JSON value of a command-line argument, or of stdin if it is C{-}.
    """
    if text == "-":
        source, raw = "standard input", stdin.read()
    else:
        source, raw = "the argument", text
    if not raw.strip():
        raise _UsageError(f"{source} is empty; give a JSON value")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        hint = ""
        if quote_hint and raw.strip()[:1].isalpha():
            hint = " (quote a string as JSON: '\"hello\"')"
        raise _UsageError(f"{source} is not JSON: {e}{hint}") from None


def _print_json(value: Any, out: IO[str], indent: int | None = None) -> None:
    out.write(json.dumps(value, indent=indent) + "\n")


def _add(client: ApiClient, args: argparse.Namespace, stdin: IO[str], out: IO[str]) -> int:
    _print_json(client.add(_json_input(args.json, stdin), wait=args.wait), out)
    return EXIT_OK


def _remove(client: ApiClient, args: argparse.Namespace, stdin: IO[str],
            out: IO[str]) -> int:
    _print_json(client.remove(args.hash, wait=args.wait), out)
    return EXIT_OK


def _list(client: ApiClient, args: argparse.Namespace, stdin: IO[str], out: IO[str]) -> int:
    for item in client.iter_objects(args.limit):
        _print_json(item, out)
    return EXIT_OK


def _get(client: ApiClient, args: argparse.Namespace, stdin: IO[str], out: IO[str]) -> int:
    _print_json(client.get(args.hash), out)
    return EXIT_OK


def _send(client: ApiClient, args: argparse.Namespace, stdin: IO[str], out: IO[str]) -> int:
    _print_json(client.send(_json_input(args.json, stdin, quote_hint=True)), out)
    return EXIT_OK


def _watch(client: ApiClient, args: argparse.Namespace, stdin: IO[str],
           out: IO[str]) -> int:
    try:
        events = client.events(snapshot=args.snapshot)
        try:
            seen = 0
            for name, data in events:
                _print_json({"event": name, "data": data}, out)
                out.flush()
                seen += 1
                if seen == args.count:
                    return EXIT_OK
        finally:
            events.close()
    except KeyboardInterrupt:
        return EXIT_OK
    raise ApiClientError("the node ended the event stream")


def _status(client: ApiClient, args: argparse.Namespace, stdin: IO[str],
            out: IO[str]) -> int:
    _print_json(client.status(), out, indent=2)
    return EXIT_OK


def _metrics(client: ApiClient, args: argparse.Namespace, stdin: IO[str],
             out: IO[str]) -> int:
    out.write(client.metrics())
    return EXIT_OK


#: The commands that talk to a node's API.
_CLIENT_COMMANDS: dict[str, Callable[[ApiClient, argparse.Namespace, IO[str], IO[str]], int]] = {
    "add": _add, "remove": _remove, "list": _list, "get": _get, "send": _send,
    "watch": _watch, "status": _status, "metrics": _metrics,
}


def _run_client(args: argparse.Namespace, stdin: IO[str], out: IO[str],
                err: IO[str]) -> int:
    """
    Run one of L{_CLIENT_COMMANDS}: a one-line message on C{err} for a usage
    error (exit 2) or a failed request (exit 1).
    """
    prefix = f"python -m dtable {args.command}"
    try:
        try:
            url = api_url(args.api)
        except ValueError as e:
            raise _UsageError(f"--api: {e}") from None
        client = ApiClient(url, _token(args))
        return _CLIENT_COMMANDS[args.command](client, args, stdin, out)
    except _UsageError as e:
        print(f"{prefix}: error: {e}", file=err)
        return EXIT_USAGE
    except ApiClientError as e:
        print(f"{prefix}: {e}", file=err)
        return EXIT_FAILED
    finally:
        out.flush()


def main(argv: Sequence[str] | None = None, *, stdin: IO[str] | None = None,
         stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """
    Run the command line; returns the exit code. The demo ends the process
    itself (it runs the reactor through L{twisted.internet.task.react}) and
    prints to sys.stdout.

    @param stdin: where C{add -} and C{send -} read (default sys.stdin).
    @param stdout: where answers go (default sys.stdout).
    @param stderr: where messages and usage errors go (default sys.stderr).
    """
    stdin = stdin if stdin is not None else sys.stdin
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = _parser(out, err)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command == "keygen":
        return _keygen(args.output, out, err)
    if args.command == "api-token":
        return EXIT_OK if _write_secret("api-token", args.output,
                                        secrets.token_urlsafe(32), err) else EXIT_FAILED
    if args.command == "master-keygen":
        return _master_keygen(args.output, out, err)
    if args.command == "master-public-key":
        return _master_public_key(args.file, out, err)
    if args.command in _CLIENT_COMMANDS:
        return _run_client(args, stdin, out, err)
    if args.command == "demo":
        from twisted.internet.task import react

        react(demo.run, (args.nodes, args.objects))
    parser.print_usage(err)
    print(f"{parser.prog}: error: choose a command: keygen, master-keygen, "
          "master-public-key, api-token, demo, add, remove, list, get, send, watch, "
          "status or metrics", file=err)
    return EXIT_USAGE


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Whatever read stdout has gone (python -m dtable list | head): end
        # quietly, with nothing left for Python to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_FAILED
    sys.exit(code)
