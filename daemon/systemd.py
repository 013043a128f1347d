"""The systemd notify protocol, spoken directly: one datagram per message to `$NOTIFY_SOCKET`.

No systemd-python needed: the protocol is `KEY=value` lines sent to an AF_UNIX
datagram socket (an address starting with `@` is in the abstract namespace).
Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY, STATUS, STOPPING, ... to the service manager, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address = ("\0" + address[1:]) if address and address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str | int) -> None:
        """One message; keys are upper-cased (`ready=1` sends `READY=1`)."""
        if not self.address:
            return
        # One line per field: a newline inside a value (an error text) would start a bogus field.
        message = "\n".join(f"{key.upper()}={' '.join(str(value).split())}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:  # the manager went away: the daemon goes on regardless
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
                self._warned = True

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def status(self, text: str) -> None:
        self.send(status=text)

    def stopping(self, status: str) -> None:
        self.send(stopping=1, status=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
