"""
Applying the firewall's blocks to the host: running the operator's block
and unblock commands as child processes, bounded in time.

This module owns only the child processes: it knows nothing of addresses,
counts or policy (L{dtable.firewall}) and nothing of the node. A command
runs without a shell, with C{{address}} in its arguments replaced.
"""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

log = Logger(namespace="dtable.firewall")

#: Seconds a command may run before it is killed.
COMMAND_TIMEOUT = 30.0


class _Command(ProcessProtocol):
    def __init__(self, argv: list[str], reactor: Any, timeout: float) -> None:
        self.argv = argv
        self.stderr = b""
        self.ended: Deferred = Deferred()
        self._reactor = reactor
        self._timeout = timeout
        self._killer: "IDelayedCall | None" = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()
        self._killer = self._reactor.callLater(self._timeout, self._kill)

    def errReceived(self, data: bytes) -> None:
        # Only the start of an error message is kept.
        self.stderr = (self.stderr + data)[:4096]

    def _kill(self) -> None:
        self._killer = None
        log.warn("firewall command {argv} still running after {seconds:g} s; killing it",
                 argv=self.argv, seconds=self._timeout)
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass

    def processEnded(self, reason: Any) -> None:
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        self._killer = None
        code = reason.value.exitCode
        if code == 0:
            log.info("firewall command {argv} done", argv=self.argv)
        else:
            log.warn("firewall command {argv} failed ({status}): {stderr}",
                     argv=self.argv,
                     status=f"exit {code}" if code is not None
                     else f"signal {reason.value.signal}",
                     stderr=self.stderr.decode("utf-8", "replace").strip())
        self.ended.callback(code)


def run_command(reactor: Any, template: str, address: str,
                timeout: float = COMMAND_TIMEOUT) -> Deferred:
    """
    Run C{template} with C{{address}} replaced, without a shell.

    @return: a Deferred that fires with the exit code (None if it was killed
        by a signal) once the process has ended, which is at most
        C{timeout} seconds later; it never fails. The outcome is logged.
    """
    argv = [part.replace("{address}", address) for part in shlex.split(template)]
    command = _Command(argv, reactor, timeout)
    try:
        reactor.spawnProcess(command, argv[0], argv, env=os.environ)
    except OSError as e:
        log.warn("firewall command {argv} could not run: {reason}", argv=argv,
                 reason=str(e))
        return succeed(None)
    return command.ended
