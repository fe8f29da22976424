"""
Three nodes, each a C{twistd -n dtable} daemon in its own child process,
driven only through their control APIs: the command line
(C{python -m dtable ...} as child processes) changes and reads the table,
sends and watches messages, and the API's client polls /status while the
network forms. Every child is stopped by its PID, the whole test is bounded,
and the nodes' logs are printed when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import shutil
import socket
import tempfile
import time
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from dtable.client import ApiClient, ApiClientError
from dtable.testing import free_ports, twistd_command

#: Seconds the whole test may take.
TEST_TIMEOUT = 120.0
#: Seconds one command of the command line may take.
COMMAND_TIMEOUT = 30.0
#: Seconds between two looks at the nodes while waiting for them.
POLL_INTERVAL = 0.1
#: Seconds a node has to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0

#: Short intervals, so that links, beacons and the master's start take
#: fractions of a second; links and peer selection are logged, so that the
#: logs printed when the test fails say why a network did not form.
FAST_OPTIONS = ["--ping-interval", "0.5", "--clean-interval", "0.5",
                "--master-sync-timeout", "0.2", "--reconnect-initial-delay", "0.05",
                "--reconnect-max-delay", "0.5", "--debug", "2"]


class Deadline:
    """
    The time left of the test's bound.
    """

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, at_most: float = TEST_TIMEOUT) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the test took longer than {TEST_TIMEOUT:g} seconds")
        return min(left, at_most)


class Daemon:
    """
    One node as C{twistd -n dtable} in a directory of its own, logging to
    C{node.log} there (and whatever twistd prints before logging starts to
    C{twistd.out}).
    """

    def __init__(self, name: str, directory: str, port: int, api_port: int,
                 arguments: list[str]) -> None:
        self.name = name
        self.directory = directory
        self.port = port
        self.api_port = api_port
        self.arguments = arguments
        self.process: subprocess.Popen | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, key_file: str, token_file: str) -> None:
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "twistd.out"), "wb") as output:
            self.process = subprocess.Popen(
                [*twistd_command(), "-n", "--pidfile=", "--logfile=node.log", "dtable",
                 "--memory", "--interface", "127.0.0.1", "--port", str(self.port),
                 "--key-file", key_file, "--api", str(self.api_port),
                 "--api-token-file", token_file, *FAST_OPTIONS, *self.arguments],
                cwd=self.directory, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT)

    def check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}")

    def stop(self) -> int | None:
        """
        SIGTERM, then SIGKILL if it has not exited after L{STOP_TIMEOUT}
        seconds. Returns C{Popen.returncode}, or None if it was killed.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
                return None
        return self.process.returncode

    def logs(self) -> str:
        texts = []
        for name in ("twistd.out", "node.log"):
            path = os.path.join(self.directory, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as log_file:
                    texts.append(f"----- {self.name} {name} -----\n{log_file.read()}")
        return "\n".join(texts)


class ThreeDaemonsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="dtable-daemons-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.deadline = Deadline(TEST_TIMEOUT)
        self.env = {name: value for name, value in os.environ.items()
                    if not name.startswith("DTABLE_")}
        self.last_statuses: list[dict[str, Any]] = []

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def dtable(self, *args: str, node: Daemon | None = None,
               stdin: str | None = None) -> subprocess.CompletedProcess:
        """
        Run C{python -m dtable ARGS}, against C{node}'s API if given (the
        token from C{$DTABLE_TOKEN_FILE}).
        """
        argv = [sys.executable, "-m", "dtable", *args]
        if node is not None:
            argv += ["--api", node.api]
        return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              env=self.env, cwd=self.directory,
                              timeout=self.deadline.left(COMMAND_TIMEOUT))

    def ok(self, *args: str, node: Daemon, stdin: str | None = None) -> list[Any]:
        """
        Run a command that must succeed; its stdout's JSON lines.
        """
        result = self.dtable(*args, node=node, stdin=stdin)
        self.assertEqual(result.returncode, 0, f"{args}: {result.stderr}")
        self.assertEqual(result.stderr, "")
        return [json.loads(line) for line in result.stdout.splitlines()]

    def wait_until(self, what: str, condition: Callable[[], bool]) -> None:
        """
        Look at the nodes every L{POLL_INTERVAL} seconds until C{condition}
        holds; fail if a node exits or the test's time is up.
        """
        while True:
            for node in self.nodes:
                node.check_running()
            try:
                if condition():
                    return
            except ApiClientError:
                pass  # A node that does not listen yet.
            if time.monotonic() + POLL_INTERVAL >= self.deadline.end:
                raise AssertionError(f"timed out waiting until {what}")
            time.sleep(POLL_INTERVAL)

    def statuses(self) -> list[dict[str, Any]]:
        """
        Every node's /status, kept to be printed if the test fails.
        """
        self.last_statuses = [client.status() for client in self.clients]
        return self.last_statuses

    def all_at(self, rev: int) -> bool:
        return all(status["head"]["rev"] >= rev for status in self.statuses())

    def test_three_daemons(self) -> None:
        key_file, token_file = self.path("net.key"), self.path("api.token")
        for command in (["keygen", "-o", key_file], ["api-token", "-o", token_file]):
            result = self.dtable(*command)
            self.assertEqual(result.returncode, 0, result.stderr)
        self.env["DTABLE_TOKEN_FILE"] = token_file
        with open(token_file) as f:
            token = f.read().strip()
        ports = free_ports(6)
        master = Daemon("node0", self.path("node0"), *ports[0:2], ["--master"])
        node1 = Daemon("node1", self.path("node1"), *ports[2:4], ["--peer", master.address])
        node2 = Daemon("node2", self.path("node2"), *ports[4:6], ["--peer", node1.address])
        self.nodes = [master, node1, node2]
        self.clients = [ApiClient(node.api, token, timeout=5) for node in self.nodes]
        try:
            for node in self.nodes:
                node.start(key_file, token_file)
            self.run_network(master, node1, node2)
        except BaseException:
            for node in self.nodes:
                print(node.logs())
            for node, status in zip(self.nodes, self.last_statuses):
                print(f"----- {node.name} last status -----\n"
                      f"{json.dumps(status, indent=1, sort_keys=True)}")
            raise
        finally:
            codes = [node.stop() for node in self.nodes]
        # twistd stops its services on SIGTERM, then ends itself with the
        # same signal, so that its exit status tells how it was stopped.
        self.assertEqual(codes, [-signal.SIGTERM] * 3, "a node had to be killed")
        for node in self.nodes:
            self.assertIn("Server Shut Down.", node.logs())

    def run_network(self, master: Daemon, node1: Daemon, node2: Daemon) -> None:
        def formed() -> bool:
            statuses = self.statuses()
            return (statuses[0]["ready"]
                    and all(status["links"] for status in statuses)
                    and len({json.dumps(status["head"]) for status in statuses}) == 1
                    and all(len(status["overlay"]["nodes"]) == 3 for status in statuses))

        self.wait_until("the three nodes are linked at one revision", formed)

        # Changes on the master, seen on node 2.
        [www] = self.ok("add", '{"name": "www", "ip": "192.0.2.1"}', "--wait", node=master)
        [pair] = self.ok("add", "--wait", node=master,
                         stdin='[{"name": "mail"}, {"name": "ns", "ttl": 60}]')
        self.assertEqual(pair["rev"], www["rev"] + 1)
        self.wait_until("every node has both batches", lambda: self.all_at(pair["rev"]))
        hashes = sorted([www["hash"], *pair["hashes"]])
        listed = self.ok("list", "--limit", "2", node=node2)
        self.assertEqual([item["hash"] for item in listed], hashes)
        self.assertEqual(self.ok("get", www["hash"], node=node2),
                         [{"name": "www", "ip": "192.0.2.1"}])

        # A message from node 2 reaches a watcher on node 0. watch gives no
        # sign of when it listens, so node 2 sends until the watcher has one.
        watch = subprocess.Popen(
            [sys.executable, "-m", "dtable", "watch", "--count", "1", "--api", master.api],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=self.env)
        try:
            sent = []
            while watch.poll() is None:
                self.ok("send", json.dumps({"from": "node2", "try": len(sent)}), node=node2)
                sent.append(len(sent))
                try:
                    watch.wait(self.deadline.left(1.0))
                except subprocess.TimeoutExpired:
                    pass
            out, err = watch.communicate(timeout=self.deadline.left(COMMAND_TIMEOUT))
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(STOP_TIMEOUT)
        self.assertEqual((watch.returncode, err), (0, ""))
        [event] = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(event["event"], "message_received")
        self.assertEqual(event["data"]["body"]["from"], "node2")
        self.assertIn(event["data"]["body"]["try"], sent)

        # A removal on the master is seen everywhere.
        gone = www["hash"]
        [removed] = self.ok("remove", gone, "--wait", node=master)
        self.assertEqual(removed, {"hash": gone, "rev": pair["rev"] + 1})
        self.wait_until("every node has the removal", lambda: self.all_at(removed["rev"]))
        for node in self.nodes:
            result = self.dtable("get", gone, node=node)
            self.assertEqual(result.returncode, 1)
            self.assertIn(f"HTTP 404 (Not Found): no object {gone}", result.stderr)
            self.assertEqual([item["hash"] for item in self.ok("list", node=node)],
                             sorted(pair["hashes"]))

        # Only the master changes the table.
        result = self.dtable("add", '{"name": "rogue"}', node=node1)
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr,
                         "python -m dtable add: the node answered HTTP 403 (Forbidden): "
                         "only the master can add objects; this node is not the master\n")

        # The master's status, through the command line, shows the overlay
        # (nodes whose beacons arrived in the last 1.5 seconds).
        def status() -> dict[str, Any]:
            [answer] = [json.loads(self.dtable("status", node=master).stdout)]
            return answer

        self.wait_until("the master's status shows three nodes in the overlay",
                        lambda: len(status()["overlay"]["nodes"]) == 3)
        answer = status()
        self.assertTrue(answer["master"])
        self.assertEqual((answer["objects"], answer["head"]["rev"]), (2, removed["rev"]))


class HelpersTests(SynchronousTestCase):
    def test_free_ports_are_distinct_and_free(self) -> None:
        ports = free_ports(5)
        self.assertEqual(len(set(ports)), 5)
        for port in ports:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))

    def test_twistd_command_runs_twistd(self) -> None:
        done = subprocess.run([*twistd_command(), "--version"], capture_output=True,
                              timeout=COMMAND_TIMEOUT)
        self.assertEqual(done.returncode, 0)
        self.assertIn(b"twistd", done.stdout + done.stderr)
