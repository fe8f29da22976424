"""
Example node 3 of 5: listens on 10001 and dials 10000. Prints every event it
receives; stop it with Ctrl-C.

    python examples/example3.py

See _common.py for the environment variables the examples read.
"""

from _common import run_node

if __name__ == "__main__":
    run_node("example3", offset=2, peer_offsets=[1])
