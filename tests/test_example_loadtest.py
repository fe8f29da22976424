"""
examples/loadtest/loadtest.py, the seed's load test: a master and a sender
run as child processes with short intervals; their state logs must show
links with RTTs, a master table that passes its bound and shrinks back,
duplicates that change nothing and messages that arrive; a sender whose
master is killed must report the stall and exit 1. Its size-bounded log, its
stall counter and its command line are tested in this process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from tests import test_examples
from tests.test_examples import EXAMPLES, Child

SCRIPT = "loadtest/loadtest.py"
#: Seconds a node has to start and print its first line.
START_DEADLINE = 10.0
#: Seconds a node has to finish its rounds, or to notice a stall.
RUN_TIMEOUT = 12.0
#: Seconds between two looks at a log file while waiting on its content.
POLL = 0.05
#: Rounds after which a node stops by itself, should a test lose track of it.
SAFETY_ROUNDS = "150"

MAX_OBJECTS = 6
SENDER_ROUNDS = 10
SENDER_LOG_BYTES = 1024


def _load_loadtest() -> Any:
    spec = importlib.util.spec_from_file_location("loadtest", EXAMPLES / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loadtest = _load_loadtest()


def records(log: Path) -> list[dict]:
    """
    Every complete line of a state log, oldest first: the rotated file,
    then the current one. A line the node is still writing is left out.
    """
    lines: list[str] = []
    for path in (Path(f"{log}.1"), log):
        if path.exists():
            lines.extend(path.read_text(encoding="utf-8").split("\n")[:-1])
    return [json.loads(line) for line in lines]


def rounds_of(log: Path) -> list[dict]:
    return [r for r in records(log) if r["event"] == "round"]


def poll(predicate: Callable[[], bool], timeout: float) -> bool:
    """
    Look at C{predicate()} every POLL seconds until it is true or
    C{timeout} seconds passed; return it.
    """
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(POLL)
    return predicate()


def _timed_links(round_records: list[dict]) -> list[dict]:
    return [link for r in round_records for link in r["links"] if link["rtt_ms"] is not None]


class LoadTestProcessTestCase(test_examples.ExampleProcessTestCase):
    def log(self, name: str) -> Path:
        return Path(self.cwd) / name

    def start_node(self, role: str, *args: str) -> tuple[Child, int]:
        """
        Start a node on a free port with short intervals; return it once it
        printed the port it listens on, with that port.
        """
        child = self.start(SCRIPT, role, "--port", "0", "--fast", *args,
                           env=self.environment())
        pattern = re.compile(rf"^{role}: listening on 127\.0\.0\.1:(\d+),")

        def listening() -> bool:
            return any(pattern.match(line) for line in child.lines)

        started = self.read_until([child], listening, time.monotonic() + START_DEADLINE)
        self.assertTrue(started, f"{role} did not start:\n{child.output}")
        port = next(int(m.group(1)) for m in map(pattern.match, child.lines) if m)
        return child, port

    def start_pair(self, master_args: list[str], sender_args: list[str]
                   ) -> tuple[Child, int, Child]:
        master, port = self.start_node(
            "master", "--interval", "0.2", "--max-objects", str(MAX_OBJECTS),
            "--remove-share", "0.5", "--log", str(self.log("master.log")),
            "--rounds", SAFETY_ROUNDS, *master_args)
        sender, _ = self.start_node(
            "sender", "--peer", f"127.0.0.1:{port}", "--log", str(self.log("sender.log")),
            *sender_args)
        return master, port, sender


class MasterAndSenderTests(LoadTestProcessTestCase):
    def test_rounds(self) -> None:
        """
        The sender runs its rounds while linked to the master and exits 0;
        the master, stopped by its PID, exits 0. Both logs hold state lines
        with links and RTTs; the master's table passed --max-objects and
        shrank back, every duplicate left it unchanged, and every message
        reached it once; the sender's log rotated within its bound.
        """
        master, port, sender = self.start_pair(
            ["--log-bytes", "1000000"],
            ["--interval", "0.3", "--rounds", str(SENDER_ROUNDS),
             "--log-bytes", str(SENDER_LOG_BYTES)])
        sender_code = self.wait_then_stop(sender, timeout=RUN_TIMEOUT)
        master_code = self.stop(master)
        report = f"{master.output}\n{sender.output}"
        self.assertEqual((sender_code, master_code), (0, 0), report)
        self.assertIn(f"sender: {SENDER_ROUNDS} rounds done", sender.output)
        self.assertNotIn("Traceback", report)

        master_log = records(self.log("master.log"))
        master_rounds = [r for r in master_log if r["event"] == "round"]
        sender_rounds = rounds_of(self.log("sender.log"))

        # Links with RTTs, on both sides.
        self.assertTrue(_timed_links(master_rounds), master_rounds)
        self.assertIn(f"127.0.0.1:{port}",
                      {link["address"] for link in _timed_links(sender_rounds)})
        # The table passed its bound and shrank back below it.
        shrunk = [r for r in master_rounds
                  if r["removed"] and r["objects"] + r["removed"] > MAX_OBJECTS]
        self.assertTrue(shrunk, master_rounds)
        self.assertLessEqual(max(r["objects"] for r in master_rounds), MAX_OBJECTS)
        self.assertEqual({r["duplicate"] for r in master_rounds}, {"ignored"})
        # Every message arrived once, from the node linked to the master.
        messages = [r["body"] for r in master_log if r["event"] == "message_received"]
        self.assertEqual(sorted(m["round"] for m in messages),
                         list(range(1, SENDER_ROUNDS + 1)), messages)
        self.assertEqual(len({m["from"] for m in messages}), 1)
        master_peers = {link["peer"] for r in master_rounds for link in r["links"]}
        self.assertIn(messages[0]["from"], master_peers)
        self.assertGreater(master_rounds[-1]["messages_received"], 0)
        self.assertGreater(max(r["duplicate_filter"] for r in master_rounds), 0)

        # The sender's log rotated, each file within its bound, and kept the
        # latest rounds in order.
        log = self.log("sender.log")
        for path in (log, Path(f"{log}.1")):
            self.assertLessEqual(path.stat().st_size, SENDER_LOG_BYTES)
        self.assertFalse(Path(f"{log}.2").exists())
        numbers = [r["round"] for r in sender_rounds]
        self.assertEqual(numbers, list(range(numbers[0], SENDER_ROUNDS + 1)))
        self.assertGreater(numbers[0], 1, "the log did not rotate")

    def test_sender_stalls_when_the_master_is_gone(self) -> None:
        """
        With the master killed by its PID, the sender's object count stops
        changing; after three rounds it says so in one line and exits 1.
        """
        master, _, sender = self.start_pair(
            [], ["--interval", "0.2", "--rounds", SAFETY_ROUNDS])
        log = self.log("sender.log")

        def replicating() -> bool:
            return len({r["objects"] for r in rounds_of(log)}) >= 3

        self.assertTrue(poll(replicating, RUN_TIMEOUT), sender.output)
        os.kill(master.process.pid, signal.SIGKILL)
        master.process.wait(timeout=RUN_TIMEOUT)
        code = self.wait_then_stop(sender, timeout=RUN_TIMEOUT)
        self.assertEqual(code, 1, sender.output)
        self.assertNotIn("Traceback", sender.output)
        last = records(log)[-1]
        self.assertEqual(last["event"], "stalled")
        self.assertIn(f"sender: stalled: object count {last['objects']} unchanged for 3 rounds",
                      sender.lines)
        self.assertGreater(last["objects"], 0)
        self.assertEqual([r["objects"] for r in rounds_of(log)[-4:]], [last["objects"]] * 4)


class CommandLineProcessTests(LoadTestProcessTestCase):
    def test_help_and_errors(self) -> None:
        """
        --help exits 0; a bad option, and a log that cannot be opened, exit
        2 with a message that names the problem; a sender that finds no peer
        exits 1.
        """
        nobody = f"127.0.0.1:{test_examples.free_port_base(1)}"
        cases = [
            (("sender", "--fast", "--port", "0", "--log", "s.log", "--peer", nobody,
              "--link-timeout", "0.5"), 1, f"sender: no link to {nobody} after 0.5 s"),
            (("master", "--help"), 0, "--remove-share"),
            (("sender", "--log", "s.log", "--interval", "soon", "--peer", "127.0.0.1:1"),
             2, "--interval"),
            (("master", "--port", "0", "--log", "missing/m.log"), 2, "missing/m.log"),
        ]
        children = [self.start(SCRIPT, *args, env=self.environment()) for args, _, _ in cases]
        for child, (args, code, text) in zip(children, cases):
            self.assertEqual(self.wait_then_stop(child), code, child.output)
            self.assertIn(text, child.output)


class TemporaryDirectoryTestCase(SynchronousTestCase):
    def directory(self) -> Path:
        path = tempfile.mkdtemp(prefix="dtable-loadtest-")
        self.addCleanup(shutil.rmtree, path)
        return Path(path)


class ArgumentTests(TemporaryDirectoryTestCase):
    def error(self, *argv: str) -> str:
        """
        What the command line says about C{argv}; it must exit 2.
        """
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            with self.assertRaises(SystemExit) as raised:
                loadtest.parse_arguments(argv)
        self.assertEqual(raised.exception.code, 2)
        return stderr.getvalue()

    def test_bad_options(self) -> None:
        for argv, text in [
            (["master"], "--log"),
            (["master", "--log", "m", "--interval", "0"], "more than 0"),
            (["master", "--log", "m", "--remove-share", "1.5"], "at most 1"),
            (["master", "--log", "m", "--max-objects", "2", "--remove-share", "0.3"],
             "removes only one"),
            (["master", "--log", "m", "--port", "70000"], "--port"),
            (["master", "--log", "m", "--log-bytes", "100"], "at least 1024"),
            (["master", "--log", "m", "--key-file", "/nonexistent/net.key"],
             "cannot read the key"),
            (["sender", "--log", "s"], "--peer"),
            (["sender", "--log", "s", "--peer", "localhost"], "use host:port"),
        ]:
            self.assertIn(text, self.error(*argv), argv)

    def test_weak_key(self) -> None:
        key = self.directory() / "weak.key"
        key.write_text("password\n")
        self.assertIn(str(key), self.error("master", "--log", "m", "--key-file", str(key)))

    def test_defaults(self) -> None:
        args, key = loadtest.parse_arguments(["sender", "--log", "s", "--peer", "[::1]:9"])
        self.assertEqual((args.port, args.interval, args.rounds, args.interface),
                         (10000, 2.0, None, "127.0.0.1"))
        self.assertEqual(key, loadtest.KEY_FILE.read_text(encoding="utf-8"))


class StateLogTests(TemporaryDirectoryTestCase):
    def test_bounded(self) -> None:
        """
        No write takes the log or its rotation past the limit; the two
        files hold the latest lines in order.
        """
        limit = 1024
        path = self.directory() / "state.log"
        log = loadtest.StateLog.open(str(path), limit)
        self.addCleanup(log.close)
        for number in range(200):
            log.write({"round": number, "pad": "x" * (number % 97)})
            sizes = [p.stat().st_size for p in (path, Path(f"{path}.1")) if p.exists()]
            self.assertLessEqual(max(sizes), limit, number)
        self.assertFalse(Path(f"{path}.2").exists())
        numbers = [r["round"] for r in records(path)]
        self.assertEqual(numbers, list(range(numbers[0], 200)))
        self.assertGreater(len(numbers), 8)


class StallWatchTests(SynchronousTestCase):
    def test_three_unchanged_rounds(self) -> None:
        watch = loadtest.StallWatch(count=0)
        seen = [watch.observe(count) for count in [1, 1, 1, 2, 2, 2, 2, 3]]
        self.assertEqual(seen, [False, False, False, False, False, False, True, False])

    def test_counts_from_the_start(self) -> None:
        watch = loadtest.StallWatch(count=5)
        self.assertEqual([watch.observe(5) for _ in range(3)], [False, False, True])
        self.assertEqual(watch.unchanged, 3)

