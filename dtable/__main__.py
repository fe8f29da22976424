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

Exit codes: 0 on success, 1 when the command itself fails (the demo did not
converge, the key file exists), 2 for a usage error. Nodes are run as
daemons with C{twistd dtable}; see C{twistd dtable --help}.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Sequence

from dtable import crypto, demo

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dtable",
        description="An encrypted, replicated table of JSON objects. "
                    "Run a node with: twistd -n dtable --key-file net.key ...")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    keygen = commands.add_parser(
        "keygen", help="make a new network key",
        description="Print a new random network key. Every node of one network "
                    "needs the same key; keep it secret.")
    keygen.add_argument(
        "-o", "--output", metavar="FILE",
        help="write the key to FILE, readable by its owner only, instead of "
             "printing it; FILE must not exist")

    master_keygen = commands.add_parser(
        "master-keygen", help="make a separate master key pair",
        description="Write the private half of a new master key pair to FILE "
                    "(readable by its owner only; give it to the master with "
                    "--master-key-file) and print its public half (give it to "
                    "every other node with --master-public-key). With it, "
                    "holding the network key is not enough to change the table.")
    master_keygen.add_argument(
        "-o", "--output", metavar="FILE", required=True,
        help="where to write the private key; FILE must not exist")

    master_public = commands.add_parser(
        "master-public-key", help="print the public half of a master key",
        description="Print the public half of the master key in FILE, for "
                    "--master-public-key.")
    master_public.add_argument("file", metavar="FILE")

    api_token = commands.add_parser(
        "api-token", help="make a bearer token for the control API",
        description="Write a new random token for the control API to FILE "
                    "(readable by its owner only); give it to the node with "
                    "--api-token-file and to its clients.")
    api_token.add_argument(
        "-o", "--output", metavar="FILE", required=True,
        help="where to write the token; FILE must not exist")

    demo_parser = commands.add_parser(
        "demo", help="run a small network of nodes in this process",
        description="Start a few nodes on 127.0.0.1, let the master add and "
                    "remove objects and one node send a message, then print "
                    "what replicated where. Exits 0 once every node holds the "
                    "master's table and got the message, 1 if that takes longer "
                    f"than {demo.DEFAULT_TIMEOUT:g} seconds.")
    demo.add_arguments(demo_parser)
    return parser


def _write_secret(command: str, output: str, text: str) -> bool:
    """
    Create C{output}, readable by its owner only, holding C{text}; False
    (with the reason on stderr) if it exists or cannot be made.
    """
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"python -m dtable {command}: cannot create {output}: {e.strerror}",
              file=sys.stderr)
        return False
    with os.fdopen(fd, "w", encoding="ascii") as key_file:
        key_file.write(text + "\n")
    return True


def _keygen(output: str | None) -> int:
    key = crypto.generate_network_key()
    if output is None:
        print(key, flush=True)
        return EXIT_OK
    return EXIT_OK if _write_secret("keygen", output, key) else EXIT_FAILED


def _master_keygen(output: str) -> int:
    text = crypto.generate_master_key()
    if not _write_secret("master-keygen", output, text):
        return EXIT_FAILED
    print(crypto.public_key_hex(crypto.parse_master_key(text)), flush=True)
    return EXIT_OK


def _master_public_key(path: str) -> int:
    try:
        key = crypto.load_master_key(path)
    except crypto.MasterKeyError as e:
        print(f"python -m dtable master-public-key: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(crypto.public_key_hex(key), flush=True)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the command line; returns the exit code. The demo ends the process
    itself (it runs the reactor through L{twisted.internet.task.react}).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return _keygen(args.output)
    if args.command == "api-token":
        return EXIT_OK if _write_secret("api-token", args.output,
                                        secrets.token_urlsafe(32)) else EXIT_FAILED
    if args.command == "master-keygen":
        return _master_keygen(args.output)
    if args.command == "master-public-key":
        return _master_public_key(args.file)
    if args.command == "demo":
        from twisted.internet.task import react

        react(demo.run, (args.nodes, args.objects))
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: choose a command: keygen, master-keygen, "
          "master-public-key, api-token or demo", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
