"""
Example node 1 of 5, the master: listens on 9999, dials itself (it notices
and moves on) and 10002, and adds {"test": "test"} once it has started.
Prints every event it receives; stop it with Ctrl-C.

    python examples/example1_master.py

See _common.py for the environment variables the examples read.
"""

from _common import run_node


def add_test_object(table):
    table.add_object({"test": "test"})


if __name__ == "__main__":
    run_node("example1", offset=0, peer_offsets=[0, 3], master=True,
             on_started=add_test_object)
