"""
Tests for the command line, C{python -m dtable}: keygen and the demo, as
child processes, and its usage errors in process.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from dtable.__main__ import main
from dtable.crypto import load_master_key, parse_network_key, public_key_hex

#: Seconds a child may run: the demo's own bound is 30 s of waiting.
CHILD_TIMEOUT = 45

#: A row of the demo's table: node, port, role, links, revision, objects,
#: messages, errors, same as master.
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(master|sender)?\s*(\d+)\s+(\d+)\s+(\d+)"
                 r"\s+(\d+)\s+(\d+)\s+(yes|NO)$")


def run_dtable(*args: str, timeout: float = CHILD_TIMEOUT) -> subprocess.CompletedProcess:
    """
    Run C{python -m dtable ARGS}; a child still running after C{timeout}
    seconds is killed and the test fails.
    """
    return subprocess.run([sys.executable, "-m", "dtable", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def demo_rows(output: str) -> list[tuple[str, ...]]:
    return [match.groups() for match in map(ROW.match, output.splitlines()) if match]


class KeygenTests(SynchronousTestCase):
    def test_prints_a_key(self) -> None:
        """
        keygen prints one key that parse_network_key accepts; two runs give
        two different keys.
        """
        first, second = run_dtable("keygen"), run_dtable("keygen")
        for result in (first, second):
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stderr, "")
            self.assertEqual(len(result.stdout.splitlines()), 1)
            self.assertEqual(len(parse_network_key(result.stdout)), 32)
        self.assertNotEqual(first.stdout, second.stdout)

    def test_output_file(self) -> None:
        """
        keygen --output writes the key to a new file only its owner can
        read, and refuses to overwrite one.
        """
        directory = tempfile.mkdtemp(prefix="dtable-cli-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "net.key")
        self.assertEqual(main(["keygen", "--output", path]), 0)
        with open(path) as f:
            key = f.read()
        parse_network_key(key)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            self.assertEqual(main(["keygen", "--output", path]), 1)
        self.assertIn(path, stderr.getvalue())
        with open(path) as f:
            self.assertEqual(f.read(), key)


class MasterKeygenTests(SynchronousTestCase):
    def test_master_keygen(self) -> None:
        """
        master-keygen writes the private half to a new owner-only file and
        prints the public half, which master-public-key prints again.
        """
        directory = tempfile.mkdtemp(prefix="dtable-cli-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "master.key")
        result = run_dtable("master-keygen", "--output", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        public = result.stdout.strip()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        key = load_master_key(path)
        self.assertEqual(public_key_hex(key), public)
        again = run_dtable("master-public-key", path)
        self.assertEqual((again.returncode, again.stdout.strip()), (0, public))
        # It never overwrites a key.
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            self.assertEqual(main(["master-keygen", "--output", path]), 1)
        self.assertIn(path, stderr.getvalue())
        self.assertEqual(public_key_hex(load_master_key(path)), public)

    def test_api_token(self) -> None:
        directory = tempfile.mkdtemp(prefix="dtable-cli-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "api.token")
        self.assertEqual(main(["api-token", "--output", path]), 0)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            token = f.read().strip()
        self.assertGreaterEqual(len(token), 40)
        with contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(main(["api-token", "--output", path]), 1)

    def test_master_public_key_of_a_bad_file(self) -> None:
        directory = tempfile.mkdtemp(prefix="dtable-cli-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "net.key")
        self.assertEqual(main(["keygen", "--output", path]), 0)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(main(["master-public-key", path]), 1)
        self.assertIn("network key, not a master key", stderr.getvalue())


class UsageTests(SynchronousTestCase):
    def assert_usage_error(self, argv: list[str], *fragments: str) -> None:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
        self.assertEqual(code, 2)
        for fragment in fragments:
            self.assertIn(fragment, stderr.getvalue())

    def test_no_command(self) -> None:
        self.assert_usage_error([], "usage:", "keygen", "master-keygen", "demo")

    def test_master_keygen_needs_output(self) -> None:
        self.assert_usage_error(["master-keygen"], "--output")

    def test_unknown_command(self) -> None:
        self.assert_usage_error(["serve"], "serve")

    def test_bad_demo_sizes(self) -> None:
        self.assert_usage_error(["demo", "--nodes", "1"], "--nodes", "between 2")
        self.assert_usage_error(["demo", "--nodes", "many"], "--nodes", "many")
        self.assert_usage_error(["demo", "--objects", "0"], "--objects", "between 1")

    def test_unknown_option(self) -> None:
        self.assert_usage_error(["keygen", "--bits", "256"], "--bits")

    def test_usage_error_from_the_shell(self) -> None:
        result = run_dtable("demo", "--nodes", "0")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--nodes", result.stderr)
        self.assertEqual(result.stdout, "")


class DemoTests(SynchronousTestCase):
    def test_three_nodes(self) -> None:
        """
        python -m dtable demo --nodes 3 converges, prints one row per node
        with the master's table everywhere, and exits 0 by itself.
        """
        result = run_dtable("demo", "--nodes", "3")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("every node holds the master's table", result.stdout)
        self.assertIn("every other node received the message", result.stdout)
        self.assertIn("all nodes stopped", result.stdout)
        self.assertNotIn("FAILED", result.stdout)
        rows = demo_rows(result.stdout)
        self.assertEqual([row[0] for row in rows], ["0", "1", "2"])
        ports = {row[1] for row in rows}
        self.assertEqual(len(ports), 3)
        self.assertEqual([row[2] for row in rows], ["master", None, "sender"])
        for node, port, role, links, rev, objects, messages, errors, same in rows:
            # Three objects added in one batch, one removed in the next.
            self.assertEqual((rev, objects, errors, same), ("2", "2", "0", "yes"))
            self.assertEqual(messages, "0" if role == "sender" else "1")
            self.assertGreaterEqual(int(links), 1)
