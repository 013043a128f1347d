"""What a process sees of its sandbox, as one JSON line: `diffusiond-probe {...}`.

tests/systemd/run.sh runs it twice in the container: as the unit's ExecStartPost= (so with
every setting of the installed unit: user, namespaces, seccomp, device and IP filters) and as
plain root, and compares. Only the standard library: it runs on the system's /usr/bin/python3.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import socket
from collections.abc import Callable


def outcome(attempt: Callable[[], object]) -> str:
    """`ok`, or the errno's name (EPERM, EROFS, ...) of what was refused."""
    try:
        attempt()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def open_device(path: str) -> None:
    os.close(os.open(path, os.O_RDWR))


def write_file(folder: str) -> None:
    path = os.path.join(folder, f".diffusiond-probe-{os.getpid()}")
    with open(path, "w") as file:
        file.write("x")
    os.unlink(path)


def interfaces() -> list[str]:
    """This process's network namespace's interfaces (/sys/class/net shows the namespace sysfs was mounted in)."""
    with open("/proc/self/net/dev") as dev:
        return sorted(line.split(":")[0].strip() for line in dev.readlines()[2:])


def main() -> None:
    with open("/proc/self/status") as status:
        caps = next(line.split()[1] for line in status if line.startswith("CapEff:"))
    seen = {
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "caps": caps,
        "net": interfaces(),
        "inet": outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
        "inet6": outcome(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()),
        "tun": outcome(lambda: open_device("/dev/net/tun")),
        "null": outcome(lambda: open_device("/dev/null")),
        "write_usr": outcome(lambda: write_file("/usr")),
        "write_etc": outcome(lambda: write_file("/etc")),
        "write_spool": outcome(lambda: write_file("/var/lib/diffusiond/spool/inbox")),
        "home": outcome(lambda: os.listdir("/home")),
        "root": outcome(lambda: os.listdir("/root")),
    }
    print("diffusiond-probe " + json.dumps(seen, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
