"""
Example node 4 of 5: listens on 10002 and dials 10000. Prints every event it
receives; stop it with Ctrl-C.

    python examples/example4.py

See _common.py for the environment variables the examples read.
"""

from _common import run_node

if __name__ == "__main__":
    run_node("example4", offset=3, peer_offsets=[1])
