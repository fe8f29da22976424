"""
Every file in examples/ is run here, as child processes: the five-node
example network must replicate the master's object to every node, and the
local demo must converge and exit 0.
"""

from __future__ import annotations

import os
import random
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from twisted.trial.unittest import SynchronousTestCase

from dtable.crypto import generate_network_key, parse_network_key
from dtable.testing import listening_port_range
from tests.test_cli import demo_rows

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: The five-node network: script -> port offset from DTABLE_EXAMPLE_PORT_BASE.
NODES = {
    "example1_master.py": 0,
    "example2.py": 1,
    "example3.py": 2,
    "example4.py": 3,
    "example5.py": 4,
}
#: What every node prints once the master's object reached it.
REPLICATED = 'object_added {"test": "test"}'

#: Seconds the five nodes have to replicate the object.
REPLICATION_DEADLINE = 12.0
#: Seconds a child has to exit once told to stop (a clean stop takes
#: milliseconds).
STOP_TIMEOUT = 5.0
#: Seconds a script that ends by itself may take.
RUN_TIMEOUT = 15.0
#: Seconds the nodes run before stopping by themselves, should a test lose
#: track of them.
NODE_SECONDS = "15"

def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As Twisted's listening ports do, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(count: int = len(NODES)) -> int:
    """
    A base port such that base .. base + count - 1 are free on 127.0.0.1,
    from L{listening_port_range}.
    """
    low, high = listening_port_range()
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(low, high - count)
        if all(_port_free(base + offset) for offset in range(count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports in {low}-{high - 1}")


class Child:
    """
    An example running as a child process, its output merged and split into
    lines.
    """

    def __init__(self, name: str, process: subprocess.Popen) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self._partial = b""
        self.terminated = False

    def terminate(self) -> None:
        """
        Send SIGTERM once: a second one could reach the child after Twisted
        restored the default handler, and kill it mid-shutdown.
        """
        if not self.terminated and self.process.poll() is None:
            self.terminated = True
            self.process.terminate()

    def feed(self, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        self.lines.extend(line.decode("utf-8", "replace") for line in complete)

    def finish(self) -> None:
        if self._partial:
            self.lines.append(self._partial.decode("utf-8", "replace"))
            self._partial = b""

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


class ExampleProcessTestCase(SynchronousTestCase):
    """
    Starts examples as child processes and always stops them.
    """

    def setUp(self) -> None:
        self.cwd = tempfile.mkdtemp(prefix="dtable-examples-")
        self.addCleanup(shutil.rmtree, self.cwd)

    def environment(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DTABLE_")}
        env.update(extra)
        return env

    def start(self, script: str, *args: str, env: dict[str, str]) -> Child:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args], cwd=self.cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        child = Child(script, process)
        self.addCleanup(self.stop, child)
        return child

    def stop(self, child: Child, timeout: float = STOP_TIMEOUT) -> int:
        """
        Ask C{child} to stop (SIGTERM to its PID), kill it if it has not
        exited after C{timeout} seconds, read the rest of its output and
        return its exit code (negative: the signal that ended it).
        """
        process = child.process
        if process.stdout.closed:
            return process.wait()
        child.terminate()
        try:
            rest, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            rest, _ = process.communicate()
            child.lines.append(f"(killed: still running {timeout:g} s after SIGTERM)")
        if rest:
            child.feed(rest)
        child.finish()
        return process.returncode

    def stop_all(self, children: list[Child]) -> list[int]:
        """
        Stop every child at once (they are linked: each one's stop must not
        wait on another's); return their exit codes.
        """
        for child in children:
            child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        return [self.stop(child, max(deadline - time.monotonic(), 0.0))
                for child in children]

    def wait_then_stop(self, child: Child, timeout: float = RUN_TIMEOUT) -> int:
        """
        Wait up to C{timeout} seconds for C{child} to exit by itself, then
        stop it; return its exit code.
        """
        try:
            output, _ = child.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.stop(child)
        child.feed(output)
        child.finish()
        return child.process.returncode

    def read_until(self, children: list[Child], done: Callable[[], bool],
                   deadline: float) -> bool:
        """
        Read the children's output until C{done()} is true, every child has
        closed its output, or C{deadline} (a time.monotonic() value) passes;
        return C{done()}.
        """
        with selectors.DefaultSelector() as selector:
            for child in children:
                selector.register(child.process.stdout, selectors.EVENT_READ, child)
            while not done() and selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    data = os.read(key.fd, 65536)
                    if data:
                        key.data.feed(data)
                    else:
                        selector.unregister(key.fileobj)
        return done()


def _report(children: list[Child]) -> str:
    return "\n\n".join(f"--- {c.name} (exit {c.process.returncode})\n{c.output}"
                       for c in children)


class FiveNodeExampleTests(ExampleProcessTestCase):
    def start_network(self) -> tuple[list[Child], bool]:
        """
        Start the five example nodes on free ports with the shared example
        key and short intervals; read their output until each printed the
        master's object. Return them, and whether that happened in time.
        """
        env = self.environment(DTABLE_EXAMPLE_PORT_BASE=str(free_port_base()),
                               DTABLE_EXAMPLE_FAST="1",
                               DTABLE_EXAMPLE_SECONDS=NODE_SECONDS)
        children = [self.start(script, env=env) for script in NODES]

        def replicated() -> bool:
            return all(REPLICATED in child.lines for child in children)

        return children, self.read_until(children, replicated,
                                         time.monotonic() + REPLICATION_DEADLINE)

    def test_every_node_gets_the_master_s_object(self) -> None:
        """
        Each of the five nodes prints the object the master added, once;
        told to stop, each stops cleanly.
        """
        children, ok = self.start_network()
        codes = self.stop_all(children)
        report = _report(children)
        self.assertTrue(ok, "the object did not reach every node:\n" + report)
        self.assertEqual(codes, [0] * len(children), report)
        for child in children:
            self.assertEqual(child.lines.count(REPLICATED), 1, report)
            self.assertIn("started", child.lines, report)
            self.assertFalse([line for line in child.lines
                              if line.startswith(("error", "Traceback"))], report)

    def test_one_node_stops_while_the_others_run(self) -> None:
        """
        Ctrl-C on one node stops it promptly even though its peers stay up
        and keep their links to it open: example2 has an outbound link to
        the master and inbound links from example3 and example4.
        """
        children, ok = self.start_network()
        example2 = children[list(NODES).index("example2.py")]
        code = self.stop(example2)
        others = [child for child in children if child is not example2]
        self.assertEqual([child.process.poll() for child in others],
                         [None] * len(others), _report(children))
        self.stop_all(others)
        report = _report(children)
        self.assertTrue(ok, "the object did not reach every node:\n" + report)
        self.assertEqual(code, 0, report)


class ExampleEnvironmentTests(ExampleProcessTestCase):
    def test_stops_by_itself(self) -> None:
        """
        With DTABLE_EXAMPLE_SECONDS a node stops cleanly by itself, even while
        it is still dialling a peer that is not there; DTABLE_KEY replaces the
        example key.
        """
        env = self.environment(DTABLE_EXAMPLE_PORT_BASE=str(free_port_base()),
                               DTABLE_EXAMPLE_FAST="1", DTABLE_EXAMPLE_SECONDS="1",
                               DTABLE_KEY=generate_network_key())
        child = self.start("example5.py", env=env)
        code = self.wait_then_stop(child)
        self.assertEqual(code, 0, child.output)
        self.assertEqual(child.lines[1:], ["started", "example5: stopped after 1 s"],
                         child.output)

    def test_bad_environment(self) -> None:
        """
        A bad variable is reported by name, with exit code 2.
        """
        for variables, name in [
            ({"DTABLE_EXAMPLE_PORT_BASE": "ninety"}, "DTABLE_EXAMPLE_PORT_BASE"),
            ({"DTABLE_EXAMPLE_PORT_BASE": "65534"}, "DTABLE_EXAMPLE_PORT_BASE"),
            ({"DTABLE_EXAMPLE_SECONDS": "0"}, "DTABLE_EXAMPLE_SECONDS"),
            ({"DTABLE_KEY": "password"}, "DTABLE_KEY"),
        ]:
            child = self.start("example2.py", env=self.environment(**variables))
            code = self.wait_then_stop(child)
            self.assertEqual(code, 2, child.output)
            self.assertIn(name, child.output)


class LocalNetworkExampleTests(ExampleProcessTestCase):
    def test_converges_and_exits(self) -> None:
        """
        examples/local_network.py runs the demo and exits 0 by itself, with
        every node holding the master's table.
        """
        child = self.start("local_network.py", "--nodes", "4", "--objects", "2",
                           env=self.environment())
        code = self.wait_then_stop(child, timeout=45.0)
        self.assertEqual(code, 0, child.output)
        rows = demo_rows(child.output)
        self.assertEqual(len(rows), 4, child.output)
        self.assertEqual({row[-1] for row in rows}, {"yes"})
        # Two objects added, one removed.
        self.assertEqual({row[5] for row in rows}, {"1"})


#: The use cases, each a folder of examples/ run by tests/test_example_NAME.py.
USE_CASES = {"cdn", "dns", "filesync", "loadtest"}


class ExamplesAreRunTests(SynchronousTestCase):
    def test_every_example_is_run(self) -> None:
        """
        Every script in examples/ is run by a test in this module (_common.py
        by each node example); a new example needs a test here.
        """
        scripts = {path.name for path in EXAMPLES.glob("*.py")}
        self.assertEqual(scripts, set(NODES) | {"local_network.py", "_common.py"})

    def test_every_use_case_is_run(self) -> None:
        """
        Every folder of examples/ is a use case with a test module of its own
        that runs each of its programs (the modules they import are not
        programs).
        """
        folders = {path.name for path in EXAMPLES.iterdir()
                   if path.is_dir() and not path.name.startswith(("_", "."))}
        self.assertEqual(folders, USE_CASES)
        tests = Path(__file__).resolve().parent
        for name in USE_CASES:
            module = (tests / f"test_example_{name}.py").read_text(encoding="utf-8")
            for program in (EXAMPLES / name).glob("*.py"):
                if '__name__ == "__main__"' in program.read_text(encoding="utf-8"):
                    self.assertIn(program.name, module, f"{program} is not run by a test")

    def test_example_key(self) -> None:
        """
        The committed key is a valid key (for the examples only).
        """
        parse_network_key((EXAMPLES / "example.key").read_text())
