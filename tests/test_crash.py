"""
Crash consistency of L{dtable.store.SqliteStore} with real processes: a
child commits large batches and is killed with SIGKILL while a commit is in
flight; the file it leaves must hold one whole committed state, whose
hashes have the root its head names.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from twisted.trial.unittest import SynchronousTestCase

from dtable.store import SqliteStore
from dtable.table import root_of

# The child: commit batches of 20,000 adds (about 150 bytes each) and 5,000
# removes of earlier objects, each with a head whose root is that of the
# resulting set. Before commit N it prints "committing N <seconds the
# previous commit took>", after it "committed N". It stops after LAST and
# waits to be killed, so the store can only be at LAST - 1 or LAST.
CHILD = textwrap.dedent(
    """
    import hashlib, random, sys, time

    from dtable.store import SqliteStore
    from dtable.table import root_of
    from dtable.wire import Head

    path, seed, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    store = SqliteStore(path)
    store.open()
    present = set()
    took = 0.0
    serial = 0
    for rev in range(1, last + 1):
        adds = []
        for _ in range(20000):
            serial += 1
            pad = "%032x" % rng.getrandbits(128)
            data = ('{"id":%d,"kind":"crash-test","pad":"%s%s%s"}'
                    % (serial, pad, pad, pad)).encode()
            adds.append((hashlib.sha256(data).hexdigest(), data))
        removes = rng.sample(sorted(present), min(5000, len(present)))
        after = (present - set(removes)) | {h for h, _ in adds}
        head = Head(rev=rev, base=rev - 1, root=root_of(after),
                    sig="a" * 128, master="b" * 64)
        print("committing %d %f" % (rev, took), flush=True)
        started = time.monotonic()
        store.commit(head, adds, removes)
        took = time.monotonic() - started
        print("committed %d" % rev, flush=True)
        present = after
    sys.stdin.read()
    """
)

LAST = 3
DEADLINE = 60.0


class Child:
    """
    A running child process and what it has printed.
    """

    def __init__(self, case: SynchronousTestCase, directory: str, seed: int) -> None:
        script = os.path.join(directory, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        self.path = os.path.join(directory, "store", "table.sqlite3")
        self.stderr_path = os.path.join(directory, "stderr")
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, script, self.path, str(seed), str(LAST)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                cwd=directory,
            )
        case.addCleanup(self.reap)
        self.output = b""

    def reap(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)
        self.proc.stdin.close()
        self.proc.stdout.close()

    def read_until(self, marker: bytes | None, deadline: float) -> bool:
        """
        Read the child's output until it holds C{marker} (or, for None,
        until it ends), the output ends or C{deadline} (a time.monotonic()
        value) passes.

        @return: whether C{marker} was seen.
        """
        fd = self.proc.stdout.fileno()
        while marker is None or marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.output += chunk
        return marker is not None and marker in self.output

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")


class CrashTests(SynchronousTestCase):
    if not hasattr(signal, "SIGKILL") or not hasattr(select, "select"):
        skip = "needs SIGKILL and select on pipes"

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="dtable-crash-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def kill_during_commit(self, round_number: int, fraction: float) -> bool:
        """
        Run a child, kill it C{fraction} of the previous commit's duration
        after it announced commit L{LAST}, and check the store it left.

        @return: whether the kill landed before the commit returned.
        """
        directory = os.path.join(self.dir, f"round-{round_number}")
        os.makedirs(directory)
        child = Child(self, directory, seed=round_number)
        deadline = time.monotonic() + DEADLINE
        announcement = b"committing %d " % LAST
        if not child.read_until(announcement, deadline):
            self.fail(f"the child did not reach commit {LAST}: "
                      f"{child.output!r}\n{child.stderr()}")
        line = child.output[child.output.index(announcement):].split(b"\n")[0]
        previous_took = float(line.split()[2])
        # The sleep chooses the kill point; nothing waits on it.
        time.sleep(fraction * previous_took)
        os.kill(child.proc.pid, signal.SIGKILL)
        self.assertEqual(child.proc.wait(timeout=DEADLINE), -signal.SIGKILL)
        child.read_until(None, deadline)
        finished = b"committed %d\n" % LAST in child.output

        store = SqliteStore(child.path)
        store.open()
        self.addCleanup(store.close)
        head = store.head()
        hashes = list(store.hashes())
        self.assertEqual(root_of(hashes), head.root)
        self.assertEqual(store.count(), len(hashes))
        self.assertIn(head.rev, (LAST - 1, LAST))
        if finished:
            self.assertEqual(head.rev, LAST)
        for h, data in store.items():
            self.assertEqual(hashlib.sha256(data).hexdigest(), h)
        store.close()
        return not finished

    def test_kill_during_commit(self) -> None:
        """
        Whatever the moment of the kill, the store holds the state before
        the interrupted commit or the state after it. Kill points spread
        over the expected commit time and past it: at once, three random
        points around it, and surely after it.
        """
        rng = random.Random()
        fractions = [0.0, rng.uniform(0.2, 0.5), rng.uniform(0.5, 0.9),
                     rng.uniform(0.9, 1.4), 3.0]
        interrupted = [self.kill_during_commit(n, f) for n, f in enumerate(fractions)]
        self.assertTrue(any(interrupted), f"no kill landed inside a commit: {fractions}")
