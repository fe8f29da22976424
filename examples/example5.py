"""
Example node 5 of 5: listens on 10003 and dials 10002. Prints every event it
receives; stop it with Ctrl-C.

    python examples/example5.py

See _common.py for the environment variables the examples read.
"""

from _common import run_node

if __name__ == "__main__":
    run_node("example5", offset=4, peer_offsets=[3])
