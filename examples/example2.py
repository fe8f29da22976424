"""
Example node 2 of 5: listens on 10000 and dials 9999. Prints every event it
receives; stop it with Ctrl-C.

    python examples/example2.py

See _common.py for the environment variables the examples read.
"""

from _common import run_node

if __name__ == "__main__":
    run_node("example2", offset=1, peer_offsets=[0])
