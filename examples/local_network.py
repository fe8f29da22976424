"""
The local demo: a few nodes in this one process on 127.0.0.1. The master adds
objects and removes one, a node sends a message, and the script prints what
replicated where, then stops every node. Exits 0 once everything arrived
everywhere, 1 if that took too long.

    python examples/local_network.py [--nodes 5] [--objects 3]

The same as ``python -m dtable demo``.
"""

import argparse

from twisted.internet.task import react

from dtable import demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Run a small dtable network in this process and show what "
                    "replicated where.")
    demo.add_arguments(parser)
    args = parser.parse_args()
    react(demo.run, (args.nodes, args.objects))
