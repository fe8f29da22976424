"""
Tests for the twistd plugin: discovery, dtable.tap.Options and makeService,
and one real C{twistd -n dtable} run with a bad option in a child process.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile

from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from dtable import crypto, tap
from dtable.__main__ import main as dtable_main
from dtable.config import INTERVALS, Config
from dtable.peers import PeerAddress
from dtable.service import DistributedTable
from dtable.testing import twistd_command

#: Seconds a twistd child may take to fail.
CHILD_TIMEOUT = 30




class KeyFileMixin:
    """
    A temporary directory with a key file made by C{python -m dtable keygen}.
    """

    def make_key_file(self) -> str:
        directory = tempfile.mkdtemp(prefix="dtable-tap-")
        self.addCleanup(shutil.rmtree, directory)
        self.directory = directory
        path = os.path.join(directory, "net.key")
        self.assertEqual(dtable_main(["keygen", "--output", path]), 0)
        return path

    def write_file(self, name: str, content: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(content)
        return path


class PluginTests(SynchronousTestCase):
    def test_discovered(self) -> None:
        """
        twistd finds a service maker named dtable, backed by dtable.tap.
        """
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "dtable"]
        self.assertEqual(len(makers), 1)
        self.assertIs(makers[0].options, tap.Options)
        self.assertTrue(makers[0].description)


class OptionsTests(KeyFileMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.key_file = self.make_key_file()

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def assert_rejected(self, args: list[str], *fragments: str) -> str:
        """
        Parsing C{args} fails with a UsageError whose message holds every
        fragment.
        """
        error = self.assertRaises(usage.UsageError, self.parse, *args)
        message = str(error)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_defaults(self) -> None:
        """
        With only a key file, the node has the seed's defaults.
        """
        options = self.parse("--key-file", self.key_file)
        self.assertEqual(options["config"], Config(memory_report_signal=True, gc_freeze=True))
        with open(self.key_file) as f:
            self.assertEqual(options["key"], f.read())

    def test_good_arguments(self) -> None:
        """
        Port, repeated peers (IPv4 and IPv6), master, debug and intervals end
        up in the config.
        """
        options = self.parse(
            "--port", "12345", "--key-file", self.key_file,
            "--peer", "127.0.0.1:10000", "--peer", "[::1]:10000",
            "--peer", "node.example:10001", "--master", "--debug", "2",
            "--ping-interval", "0.5", "--batch-window", "0",
            "--message-ttl", "60", "--batch-max-ops", "10")
        config = options["config"]
        self.assertEqual(config.port, 12345)
        self.assertEqual(config.peers, (PeerAddress("127.0.0.1", 10000),
                                        PeerAddress("::1", 10000),
                                        PeerAddress("node.example", 10001)))
        self.assertTrue(config.master)
        self.assertEqual(config.debug, 2)
        self.assertEqual(config.ping_interval, 0.5)
        self.assertEqual(config.batch_window, 0)
        self.assertEqual(config.message_ttl, 60)
        self.assertEqual(config.batch_max_ops, 10)

    def test_short_options(self) -> None:
        config = self.parse("-p", "0", "-k", self.key_file, "-m", "-d", "1",
                            "--memory")["config"]
        self.assertEqual((config.port, config.master, config.debug), (0, True, 1))
        self.assertIsNone(config.store_path())

    def test_data_dir(self) -> None:
        """
        The table lives in --data-dir, by default dtable-PORT in the working
        directory; a free port (0) needs --data-dir or --memory.
        """
        config = self.parse("-k", self.key_file, "--data-dir", self.directory)["config"]
        self.assertEqual(os.path.dirname(config.store_path()), self.directory)
        config = self.parse("-k", self.key_file, "-p", "10005")["config"]
        self.assertEqual(os.path.dirname(config.store_path()),
                         os.path.join(os.getcwd(), "dtable-10005"))
        self.assert_rejected(["-k", self.key_file, "-p", "0"], "--data-dir", "port 0")

    def test_missing_key_file(self) -> None:
        self.assert_rejected(["--port", "9999"], "--key-file", "keygen")

    def test_unreadable_key_file(self) -> None:
        missing = os.path.join(self.directory, "missing.key")
        self.assert_rejected(["--key-file", missing], "--key-file", missing)
        self.assert_rejected(["--key-file", self.directory], "--key-file")
        binary = self.write_file("binary.key", b"\xff\xfe\x00 not text")
        self.assert_rejected(["--key-file", binary], "--key-file", binary)

    def test_weak_key_file(self) -> None:
        weak = self.write_file("weak.key", b"password\n")
        self.assert_rejected(["--key-file", weak], "--key-file", weak, "keygen")
        empty = self.write_file("empty.key", b"")
        self.assert_rejected(["--key-file", empty], "--key-file", "empty")

    def test_bad_peer(self) -> None:
        for peer in ["127.0.0.1", "::1:10000", "[::1]10000", "[nope]:1",
                     "host:port", "127.0.0.1:70000"]:
            self.assert_rejected(["--key-file", self.key_file, "--peer", peer],
                                 "--peer", peer)

    def test_port_out_of_range(self) -> None:
        for port in ["65536", "70000", "-1"]:
            self.assert_rejected(["--key-file", self.key_file, "--port", port],
                                 "--port", port)

    def test_port_not_a_number(self) -> None:
        self.assert_rejected(["--key-file", self.key_file, "--port", "abc"], "abc")

    def test_debug_out_of_range(self) -> None:
        self.assert_rejected(["--key-file", self.key_file, "--debug", "7"], "--debug", "7")

    def test_negative_intervals(self) -> None:
        """
        Every interval option rejects a negative value, naming the option.
        """
        self.assertIn("ping_interval", INTERVALS)
        for name in INTERVALS:
            option = "--" + name.replace("_", "-")
            self.assert_rejected(["--key-file", self.key_file, option, "-1"], option)

    def test_zero_intervals(self) -> None:
        """
        Intervals that must be positive reject zero; the batch window and
        the master's sync wait accept it (publish at once, do not wait).
        """
        for option in ["--ping-interval", "--clean-interval", "--handshake-timeout",
                       "--request-timeout", "--message-ttl", "--catch-up-retry"]:
            self.assert_rejected(["--key-file", self.key_file, option, "0"], option)
        config = self.parse("--key-file", self.key_file, "--batch-window", "0",
                            "--master-sync-timeout", "0")["config"]
        self.assertEqual((config.batch_window, config.master_sync_timeout), (0, 0))

    def test_unknown_option(self) -> None:
        self.assert_rejected(["--key-file", self.key_file, "--bogus"], "bogus")

    def make_master_key(self) -> tuple[str, str]:
        """
        A master key file made by C{python -m dtable master-keygen}, and the
        public key it printed.
        """
        path = os.path.join(self.directory, "master.key")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            self.assertEqual(dtable_main(["master-keygen", "--output", path]), 0)
        return path, stdout.getvalue().strip()

    def test_master_key_pair(self) -> None:
        """
        The master takes the private half from --master-key-file; the other
        nodes take the public half with --master-public-key.
        """
        path, public = self.make_master_key()
        options = self.parse("-k", self.key_file, "--master", "--master-key-file", path,
                             "--master-public-key", public)
        self.assertEqual(crypto.public_key_hex(options["master_key"]), public)
        config = self.parse("-k", self.key_file, "--master-public-key",
                            public.upper())["config"]
        self.assertEqual(config.master_public_key, public)
        self.assertIsNone(self.parse("-k", self.key_file)["master_key"])

    def test_master_key_mistakes(self) -> None:
        path, public = self.make_master_key()
        self.assert_rejected(["-k", self.key_file, "--master-key-file", path],
                             "master only", "master_public_key")
        self.assert_rejected(["-k", self.key_file, "--master", "--master-public-key",
                              public], "private half")
        self.assert_rejected(["-k", self.key_file, "--master", "--master-key-file",
                              self.key_file], "--master-key-file", "network key")
        missing = os.path.join(self.directory, "nope.key")
        self.assert_rejected(["-k", self.key_file, "--master", "--master-key-file",
                              missing], "--master-key-file", missing)
        self.assert_rejected(["-k", self.key_file, "--master-public-key", "12ab"],
                             "--master-public-key", "64 hex")
        other = crypto.public_key_hex(crypto.parse_master_key(crypto.generate_master_key()))
        self.assert_rejected(["-k", self.key_file, "--master", "--master-key-file", path,
                              "--master-public-key", other], "not the public half")

    def test_firewall_options(self) -> None:
        config = self.parse(
            "-k", self.key_file, "--warn-after-new-connections", "5",
            "--block-after-new-connections", "10", "--block-after-failures", "3",
            "--block-for", "60", "--ipv6-group-depth", "3", "--ipv6-subnet-breach", "7",
            "--never-block", "--firewall-max-addresses", "1000",
            "--max-pending-handshakes", "16",
            "--block-command", "iptables -I INPUT -s {address} -j DROP",
            "--unblock-command", "iptables -D INPUT -s {address} -j DROP")["config"]
        self.assertEqual(
            (config.warn_after_new_connections, config.block_after_new_connections,
             config.block_after_failures, config.block_for, config.ipv6_group_depth,
             config.ipv6_subnet_breach, config.never_block, config.firewall_max_addresses,
             config.max_pending_handshakes),
            (5, 10, 3, 60, 3, 7, True, 1000, 16))
        self.assertEqual(config.block_command, "iptables -I INPUT -s {address} -j DROP")
        defaults = self.parse("-k", self.key_file)["config"]
        self.assertEqual(
            (defaults.warn_after_new_connections, defaults.block_after_new_connections,
             defaults.block_after_failures, defaults.block_for, defaults.ipv6_group_depth,
             defaults.ipv6_subnet_breach, defaults.never_block),
            (80, 600, 30, 3600, 4, 40, False))

    def test_api_options(self) -> None:
        token = self.write_file("api.token", b"t" * 43 + b"\n")
        config = self.parse("-k", self.key_file, "--api", "8080",
                            "--api-token-file", token)["config"]
        self.assertEqual((config.api, config.api_token_file, config.api_access_log),
                         ("8080", token, None))
        self.assertIsNone(self.parse("-k", self.key_file)["config"].api)
        config = self.parse("-k", self.key_file, "--api", "8080", "--api-token-file", token,
                            "--api-access-log", "/var/log/dtable-api.log")["config"]
        self.assertEqual(config.api_access_log, "/var/log/dtable-api.log")

    def test_bad_api_options(self) -> None:
        token = self.write_file("api.token", b"t" * 43)
        self.assert_rejected(["-k", self.key_file, "--api", "8080"],
                             "--api needs --api-token-file", "api-token")
        self.assert_rejected(["-k", self.key_file, "--api", "nope:1", "--api-token-file",
                              token], "--api", "nope:1")
        short = self.write_file("short.token", b"abc")
        self.assert_rejected(["-k", self.key_file, "--api", "8080", "--api-token-file",
                              short], "--api-token-file", "too short")
        missing = os.path.join(self.directory, "missing.token")
        self.assert_rejected(["-k", self.key_file, "--api", "8080", "--api-token-file",
                              missing], "--api-token-file", missing)

    def test_bad_firewall_options(self) -> None:
        self.assert_rejected(["-k", self.key_file, "--ipv6-group-depth", "9"],
                             "--ipv6-group-depth", "1-8")
        self.assert_rejected(["-k", self.key_file, "--block-after-failures", "0"],
                             "--block-after-failures")
        self.assert_rejected(["-k", self.key_file, "--block-command", "iptables -F"],
                             "--block-command", "{address}")


class MakeServiceTests(KeyFileMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.key_file = self.make_key_file()
        self.options = tap.Options()
        self.options.parseOptions([
            "--port", "0", "--key-file", self.key_file, "--master",
            "--peer", "127.0.0.1:10000", "--peer", "[::1]:10001",
            "--ping-interval", "0.25", "--data-dir", os.path.join(self.directory, "data")])

    def test_builds_a_stopped_node(self) -> None:
        """
        makeService returns a DistributedTable with the parsed config and
        key; it neither starts nor listens.
        """
        reactor = MemoryReactorClock()
        service = tap.makeService(self.options, reactor=reactor)
        self.assertIsInstance(service, DistributedTable)
        self.assertIsInstance(service, MultiService)
        self.assertIs(service.config, self.options["config"])
        self.assertEqual(service.config.peers, (PeerAddress("127.0.0.1", 10000),
                                                PeerAddress("::1", 10001)))
        self.assertTrue(service.config.master)
        self.assertEqual(service.config.ping_interval, 0.25)
        self.assertIs(service.reactor, reactor)
        self.assertFalse(service.running)
        self.assertEqual(service.links, [])
        self.assertEqual(len(service), 0)
        self.assertEqual((reactor.tcpServers, reactor.sslServers,
                          reactor.tcpClients, reactor.sslClients), ([], [], [], []))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_through_the_plugin(self) -> None:
        """
        The service maker twistd uses builds the same node with the global
        reactor.
        """
        from twisted.internet import reactor

        [maker] = [p for p in getPlugins(IServiceMaker) if p.tapname == "dtable"]
        service = maker.makeService(self.options)
        self.assertIsInstance(service, DistributedTable)
        self.assertIs(service.reactor, reactor)
        self.assertFalse(service.running)


class TwistdTests(KeyFileMixin, SynchronousTestCase):
    """
    The real twistd, in a child process, refuses bad options.
    """

    def run_twistd(self, *args: str) -> tuple[int, str]:
        """
        Run C{twistd -n dtable ARGS} in an empty directory; return its exit
        code and output. It must leave nothing behind (no log, no pid file).
        """
        cwd = tempfile.mkdtemp(prefix="dtable-twistd-")
        self.addCleanup(shutil.rmtree, cwd)
        result = subprocess.run(
            [*twistd_command(), "-n", "dtable", *args], cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=CHILD_TIMEOUT)
        self.assertEqual(os.listdir(cwd), [])
        return result.returncode, result.stdout.decode("utf-8", "replace")

    def test_bad_port(self) -> None:
        key_file = self.make_key_file()
        code, output = self.run_twistd("--key-file", key_file, "--port", "70000")
        self.assertNotEqual(code, 0, output)
        self.assertIn("--port: port must be 0-65535, not 70000", output)

    def test_missing_key_file(self) -> None:
        code, output = self.run_twistd("--port", "9999")
        self.assertNotEqual(code, 0, output)
        self.assertIn("--key-file is required", output)
