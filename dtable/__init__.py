"""
dtable: an encrypted, replicated table of JSON objects for Twisted.

One master node adds and removes objects; every other node, online now or
returning after a long absence, converges to exactly the master's table. Any
node can broadcast messages to every node that is online. Peers talk over
mutual TLS 1.3 with certificates derived from one network key.

    from dtable import DistributedTable, TableObserver

    table = DistributedTable(port=9999, key=open("net.key").read(),
                             peers=["127.0.0.1:10000"], master=True)
    table.setServiceParent(application)
    table.add_object({"name": "www", "ip": "192.0.2.1"})
"""

from dtable.canonical import InvalidObjectError, object_hash
from dtable.config import Config, ConfigError
from dtable.crypto import WeakKeyError, generate_network_key
from dtable.interfaces import IStore, ITableObserver, TableObserver
from dtable.service import DistributedTable, NotMasterError
from dtable.store import MemoryStore

__all__ = [
    "Config",
    "ConfigError",
    "DistributedTable",
    "IStore",
    "ITableObserver",
    "InvalidObjectError",
    "MemoryStore",
    "NotMasterError",
    "TableObserver",
    "WeakKeyError",
    "generate_network_key",
    "object_hash",
]
