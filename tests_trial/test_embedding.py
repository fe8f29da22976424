"""
dtable embedded in a trial test: trial fails a test that leaves the reactor
dirty, so these also prove that stopService closes every port, connection and
timer.
"""

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from dtable import DistributedTable, TableObserver
from dtable.crypto import generate_network_key
from dtable.testing import FAST, LocalNetwork, wait_for


class Collect(TableObserver):
    def __init__(self):
        self.added = []
        self.messages = []

    def object_added(self, obj):
        self.added.append(obj)

    def message_received(self, msg):
        self.messages.append(msg)


class EmbeddingTests(TestCase):
    timeout = 60

    async def test_two_nodes_under_an_application_service(self):
        """
        Nodes parented to an application's MultiService replicate, and
        stopping the application stops them cleanly.
        """
        key = generate_network_key()
        app = MultiService()
        master = DistributedTable(port=0, key=key, master=True, reactor=reactor,
                                  interface="127.0.0.1", **FAST)
        master.setServiceParent(app)
        app.startService()
        self.addCleanup(lambda: app.stopService() if app.running else None)
        port = await master.when_listening()
        replica = DistributedTable(port=0, key=key, peers=[f"127.0.0.1:{port}"],
                                   reactor=reactor, interface="127.0.0.1", **FAST)
        seen = Collect()
        replica.subscribe(seen)
        replica.setServiceParent(app)
        await replica.when_started()

        h = master.add_object({"name": "www", "ip": "192.0.2.1"})
        await wait_for(replica, lambda t: h in t)
        self.assertEqual(seen.added, [{"name": "www", "ip": "192.0.2.1"}])
        self.assertEqual(replica.get(h), master.get(h))

        master.send_message({"load": 0.3})
        await wait_for(replica, lambda t: seen.messages)
        self.assertEqual(seen.messages, [{"load": 0.3}])
        await app.stopService()

    async def test_local_network_helper(self):
        """
        dtable.testing.LocalNetwork runs a small network for an application's
        own tests.
        """
        net = LocalNetwork(reactor, size=3)
        await net.start()
        self.addCleanup(net.stop)
        for i in range(5):
            net.master.add_object({"n": i})
        await net.converged()
        for node in net.nodes:
            self.assertEqual(len(node), 5)
